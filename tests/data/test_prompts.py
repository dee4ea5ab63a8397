"""Prompt building and token types, on hand-worked tokenizations."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import build_prompt
from icl_circuits.data.prompts import TOKEN_TYPES, TYPE_ID, PromptBatch

from tests.helpers import word_tokenizer

WORDS = ["Follow", "the", "pattern:", "->", "hot", "cold", "big", "small", "fast", "slow", "had", "gone", "United", "States", "Washington"]


def _types(prompt):
    return [TOKEN_TYPES[t] for t in prompt.types]


def test_hand_worked_three_shot_prompt():
    tok = word_tokenizer(WORDS)
    p = build_prompt(tok, [("hot", "cold"), ("big", "small"), ("fast", "slow")])
    assert p.text == "Follow the pattern:\nhot -> cold\nbig -> small\nfast -> slow"
    pieces = [tok.convert_ids_to_tokens(i) for i in p.ids]
    assert pieces == ["<bos>", "Follow", " the", " pattern:", "\n", "hot", " ->", " cold", "\n", "big", " ->", " small", "\n", "fast", " ->", " slow"]
    assert _types(p) == [
        "bos", "prompt", "prompt", "prompt", "newline",
        "input", "arrow", "output", "newline",
        "input", "arrow", "output", "newline",
        "input", "arrow", "output",
    ]  # fmt: skip
    assert [(s.input, s.arrow, s.outputs, s.newline) for s in p.pairs] == [(5, 6, (7,), 8), (9, 10, (11,), 12), (13, 14, (15,), None)]


def test_multi_token_inputs_and_outputs():
    tok = word_tokenizer(WORDS)
    p = build_prompt(tok, [("United States", "Washington"), ("big", "had gone")])
    # 0 bos | 1-3 prompt | 4 \n | 5 United 6 States 7 -> 8 Washington 9 \n | 10 big 11 -> 12 had 13 gone
    assert _types(p)[5:] == ["extra", "input", "arrow", "output", "newline", "input", "arrow", "extra", "output"]
    batch = PromptBatch.collate([p])
    s1 = batch.scoring("last", n_tokens=1)
    assert s1.positions.nonzero().tolist() == [[0, 11]]
    assert s1.targets.tolist() == [tok.convert_tokens_to_ids(" had")]
    s2 = batch.scoring("last", n_tokens=2)
    assert s2.positions.nonzero().tolist() == [[0, 11], [0, 12]]
    assert s2.targets.tolist() == tok.convert_tokens_to_ids([" had", " gone"])
    assert s2.is_first.tolist() == [True, False]
    s_all = batch.scoring("all", n_tokens=5)
    assert s_all.positions.nonzero()[:, 1].tolist() == [7, 11, 12]
    assert batch.scoring("all_but_first", n_tokens=1).positions.nonzero()[:, 1].tolist() == [11]
    # the default scores the first 2 tokens of each output (the authors' n_first=2)
    assert batch.scoring("all_but_first").positions.nonzero()[:, 1].tolist() == [11, 12]


def test_cli_score_token_default_is_the_librarys():
    from icl_circuits import cli
    from icl_circuits.data import prompts

    assert cli.N_SCORE_TOKENS == prompts.N_SCORE_TOKENS == 2


def test_batch_padding_masks_and_arrows():
    tok = word_tokenizer(WORDS)
    long = build_prompt(tok, [("hot", "cold"), ("big", "small")])
    short = build_prompt(tok, [("fast", "slow")])
    b = PromptBatch.collate([long, short], pad_id=tok.pad_token_id)
    assert b.input_ids.shape == (2, 12)
    assert b.attention_mask[1].tolist() == [1] * 8 + [0] * 4
    assert (b.token_types[1, 8:] == -1).all() and (b.input_ids[1, 8:] == tok.pad_token_id).all()
    assert b.arrow_mask("all").nonzero().tolist() == [[0, 6], [0, 10], [1, 6]]
    assert b.arrow_mask("last").nonzero().tolist() == [[0, 10], [1, 6]]
    assert b.arrow_mask("demos").nonzero().tolist() == [[0, 6]]
    assert b.type_mask("output").nonzero().tolist() == [[0, 7], [0, 11], [1, 7]]
    assert b.slice(1, 2).input_ids.shape == (1, 8)


def test_scoring_metrics_against_hand_computation():
    tok = word_tokenizer(WORDS)
    b = PromptBatch.collate([build_prompt(tok, [("hot", "cold")]), build_prompt(tok, [("big", "small")])])
    sc = b.scoring()
    v = 40
    lp = torch.log_softmax(torch.randn(2, v), -1)
    targets = sc.targets.tolist()
    lp[0, targets[0]] = 10.0  # row 0 gets its target as argmax, row 1 does not
    lp[1, targets[1]] = -50.0
    assert sc.nll(lp).item() == pytest.approx(-(lp[0, targets[0]] + lp[1, targets[1]]).item() / 2)
    assert sc.accuracy(lp).item() == 0.5


def test_tokenizer_that_merges_across_pairs_is_refused():
    tok = word_tokenizer(WORDS + ["cold\nbig"])
    # a tokenizer whose pieces swallow the separator cannot be labelled
    from tokenizers import Regex, pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^ ]+"), behavior="isolated")
    with pytest.raises(ValueError, match="merged"):
        build_prompt(tok, [("hot", "cold"), ("big", "small")])
    with pytest.raises(ValueError, match="at least one"):
        build_prompt(tok, [])


def test_type_ids_are_stable():
    assert TYPE_ID == {"bos": 0, "prompt": 1, "input": 2, "arrow": 3, "output": 4, "newline": 5, "extra": 6}


def test_eval_prompts_are_the_held_out_or_training_pairs_as_before():
    """The one builder of evaluation prompts: the same prompts as zero_shot_prompts / fake_pair_prompts of the split
    (seed + 1 for 'eval', seed + 2 for 'calibration'), steered at the query arrow or the fake pair's output."""
    import random

    from icl_circuits import Task
    from icl_circuits.data.prompts import eval_prompts, fake_pair_prompts, zero_shot_prompts
    from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE

    from tests.helpers import ANTONYMS, UPPER

    tok = word_tokenizer(["Follow", "the", "pattern:", "->", "X", "Y"] + [w for x, y in ANTONYMS + UPPER for w in (x, y)])
    task = Task("mix", tuple(ANTONYMS + UPPER))
    train, held = task.split(DEFAULT_EVAL_SHARE, 3)
    ex = eval_prompts(tok, task, "execution", "eval", 5, seed=3)
    assert torch.equal(ex.batch.input_ids, zero_shot_prompts(tok, held, 5, seed=4).input_ids)
    assert torch.equal(ex.steer_at, ex.batch.arrow_mask("last"))
    cal = eval_prompts(tok, task, "detection", "calibration", 5, seed=3)
    assert torch.equal(cal.batch.input_ids, fake_pair_prompts(tok, train, 5, seed=5).input_ids)
    assert torch.equal(cal.steer_at, cal.batch.output_mask("first"))
    # valid_only: the first n of a seeded shuffle of the split's pairs; take() re-collates a part
    shuffled = list(held.pairs)
    random.Random(9).shuffle(shuffled)
    v = eval_prompts(tok, task, "execution", "eval", 4, seed=3, prompt_seed=9, valid_only=True)
    assert [p.text for p in v.batch.prompts] == [build_prompt(tok, [p]).text for p in shuffled[:4]]
    assert torch.equal(v.take(1, 3).batch.input_ids, PromptBatch.collate(v.batch.prompts[1:3], v.batch.pad_id).input_ids)
    with pytest.raises(ValueError, match="setting"):
        eval_prompts(tok, task, "bogus")
    with pytest.raises(ValueError, match="split"):
        eval_prompts(tok, task, split="test")
