"""ICL prompts, their token types, and the positions that score each output.

Format (spec part 2):  <bos>Follow the pattern:\\n{x1} -> {y1}\\n ... {xq} -> {yq}

Token types (paper Sec. 4.1.1): prompt (instruction), input (last token before an arrow),
arrow, output (last token of an output), newline, extra (other tokens of multi-token
inputs/outputs). We add `bos` so the attention-sink position never pollutes another type.
The last pair's output is kept in the sequence (teacher forcing) so its first n tokens
can be scored; the arrow and everything before it never see it (the model is causal).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from icl_circuits.data.tasks import DEFAULT_EVAL_SHARE, Task

TOKEN_TYPES: tuple[str, ...] = ("bos", "prompt", "input", "arrow", "output", "newline", "extra")
TYPE_ID = {t: i for i, t in enumerate(TOKEN_TYPES)}
PAD_TYPE = -1
# Every steering and circuit metric scores the first N_SCORE_TOKENS tokens of each scored output (fewer
# when an output is shorter): the authors score 2 in TVC, the layer sweep and the heatmaps (n_first=2).
N_SCORE_TOKENS = 2


@dataclass(frozen=True)
class PromptFormat:
    prefix: str = "Follow the pattern:\n"
    arrow: str = " ->"
    before_output: str = " "
    separator: str = "\n"


@dataclass(frozen=True)
class PairSpan:
    """Token positions of one (input, output) pair inside a prompt."""

    input: int  # position of the input's last token
    arrow: int
    outputs: tuple[int, ...]  # positions of all output tokens
    newline: int | None  # None for a final pair with no trailing separator


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    types: tuple[int, ...]  # TYPE_ID per token
    pairs: tuple[PairSpan, ...]
    text: str


def build_prompt(tokenizer: object, pairs: Sequence[tuple[str, str]], fmt: PromptFormat = PromptFormat()) -> Prompt:
    """Tokenize one prompt whose last pair is the query; label every token."""
    if not pairs:
        raise ValueError("a prompt needs at least one (input, output) pair")
    # Character segments: (start, end, role, pair index). Token roles come from the segment
    # holding the token's last character, so the labelling follows the tokenizer exactly.
    text, segs = "", []

    def add(s: str, role: str, pair: int = -1) -> None:
        nonlocal text
        segs.append((len(text), len(text) + len(s), role, pair))
        text += s

    for chunk in _split_newlines(fmt.prefix):
        add(chunk, "newline" if chunk.strip("\n") == "" else "prompt")
    for i, (x, y) in enumerate(pairs):
        add(x, "input", i)
        add(fmt.arrow, "arrow", i)
        add(fmt.before_output + y, "output", i)
        if i < len(pairs) - 1:
            add(fmt.separator, "newline", i)

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = tokenizer.eos_token_id  # type: ignore[attr-defined]  # GPT-2 style: <|endoftext|> opens a document
    ids = [bos, *enc["input_ids"]]
    roles: list[tuple[str, int]] = [("bos", -1)]
    for start, end in enc["offset_mapping"]:
        if end <= start:
            roles.append(("extra", -1))
            continue
        seg = next(s for s in segs if s[0] <= end - 1 < s[1])
        roles.append((seg[2], seg[3]))

    types = [TYPE_ID["extra"]] * len(ids)
    spans = []
    for i in range(len(pairs)):
        pos = {r: [p for p, (role, k) in enumerate(roles) if k == i and role == r] for r in ("input", "arrow", "output", "newline")}
        missing = [r for r in ("input", "arrow", "output") if not pos[r]]
        if missing or (i < len(pairs) - 1 and not pos["newline"]):
            raise ValueError(
                f"pair {i} {pairs[i]!r}: the tokenizer merged its {missing or ['newline']} with a neighbour; "
                "cannot label token types (try another PromptFormat)"
            )
        if pos["output"][0] != pos["arrow"][-1] + 1:
            raise ValueError(f"pair {i} {pairs[i]!r}: output does not start right after the arrow token")
        spans.append(PairSpan(pos["input"][-1], pos["arrow"][-1], tuple(pos["output"]), (pos["newline"] or [None])[-1]))
        types[pos["input"][-1]] = TYPE_ID["input"]
        types[pos["arrow"][-1]] = TYPE_ID["arrow"]
        types[pos["output"][-1]] = TYPE_ID["output"]
        for p in pos["newline"]:
            types[p] = TYPE_ID["newline"]
    for p, (role, k) in enumerate(roles):
        if role in ("bos", "prompt") or (role == "newline" and k == -1):
            types[p] = TYPE_ID[role]
    return Prompt(tuple(ids), tuple(types), tuple(spans), text)


def _split_newlines(s: str) -> list[str]:
    """'a\\nb\\n' -> ['a', '\\n', 'b', '\\n'] so prefix newlines are labelled newline."""
    out, cur = [], ""
    for ch in s:
        if (ch == "\n") != (cur[-1:] == "\n") and cur:
            out.append(cur)
            cur = ""
        cur += ch
    return out + ([cur] if cur else [])


@dataclass
class PromptBatch:
    """Right-padded prompts: the model is causal, so padding on the right never leaks left."""

    prompts: list[Prompt]
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    token_types: torch.Tensor  # [batch, seq], PAD_TYPE on padding
    pad_id: int = 0

    @classmethod
    def collate(cls, prompts: Sequence[Prompt], pad_id: int = 0) -> "PromptBatch":
        seq = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), seq), pad_id, dtype=torch.long)
        types = torch.full((len(prompts), seq), PAD_TYPE, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p.ids)] = torch.tensor(p.ids)
            types[b, : len(p.types)] = torch.tensor(p.types)
        return cls(list(prompts), ids, (types != PAD_TYPE).long(), types, pad_id)

    def __len__(self) -> int:
        return len(self.prompts)

    def slice(self, start: int, stop: int) -> "PromptBatch":
        """Prompts start..stop re-collated (padding trimmed to their own longest prompt)."""
        return PromptBatch.collate(self.prompts[start:stop], self.pad_id)

    def type_mask(self, *types: str) -> torch.Tensor:
        """[batch, seq] bool, True at tokens of any of the given types."""
        return torch.isin(self.token_types, torch.tensor([TYPE_ID[t] for t in types]))

    def arrow_mask(self, which: str = "all") -> torch.Tensor:
        """[batch, seq] bool at arrows: 'all', 'last' (the query's), or 'demos' (all but the query's)."""
        mask = torch.zeros_like(self.token_types, dtype=torch.bool)
        for b, p in enumerate(self.prompts):
            spans = {"all": p.pairs, "last": p.pairs[-1:], "demos": p.pairs[:-1]}[which]
            for s in spans:
                mask[b, s.arrow] = True
        return mask

    def output_mask(self, which: str = "all") -> torch.Tensor:
        """[batch, seq] bool at the last token of outputs: 'all', 'last', 'demos', or 'first' (the first pair's)."""
        mask = torch.zeros_like(self.token_types, dtype=torch.bool)
        for b, p in enumerate(self.prompts):
            spans = {"all": p.pairs, "last": p.pairs[-1:], "demos": p.pairs[:-1], "first": p.pairs[:1]}[which]
            for s in spans:
                mask[b, s.outputs[-1]] = True
        return mask

    def scoring(self, pairs: str = "last", n_tokens: int = N_SCORE_TOKENS) -> "Scoring":
        """Positions whose next-token log-probs score the first n_tokens of chosen outputs.

        pairs: 'last' (the query), 'all', or 'all_but_first' (the paper's SFC metric, Sec. 4.1.2).
        """
        positions = torch.zeros_like(self.token_types, dtype=torch.bool)
        targets = torch.zeros_like(self.input_ids)
        first = torch.zeros_like(positions)  # scoring positions of each output's first token
        for b, p in enumerate(self.prompts):
            chosen = {"last": p.pairs[-1:], "all": p.pairs, "all_but_first": p.pairs[1:]}[pairs]
            for s in chosen:
                for j, out_pos in enumerate(s.outputs[:n_tokens]):
                    positions[b, out_pos - 1] = True
                    targets[b, out_pos - 1] = p.ids[out_pos]
                    first[b, out_pos - 1] = j == 0
        return Scoring(positions, targets[positions], first[positions])


@dataclass
class Scoring:
    """Where and what to score. Rows follow torch.nonzero order of `positions`."""

    positions: torch.Tensor  # [batch, seq] bool
    targets: torch.Tensor  # [n] token ids
    is_first: torch.Tensor  # [n] bool, the row predicts an output's first token

    def nll(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Mean negative log-prob of the targets. logprobs: [n, vocab]."""
        return -logprobs.gather(-1, self.targets.to(logprobs.device)[:, None]).mean()

    def accuracy(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Share of outputs whose first token is the argmax."""
        first = self.is_first.to(logprobs.device)
        return (logprobs[first].argmax(-1) == self.targets.to(logprobs.device)[first]).float().mean()


def icl_prompts(
    tokenizer: object,
    task: Task,
    n_prompts: int,
    n_shots: int,
    seed: int = 0,
    fmt: PromptFormat = PromptFormat(),
    queries: Task | None = None,
) -> PromptBatch:
    """n_prompts prompts of n_shots demonstrations from `task` plus one query.

    The query comes from `queries` (e.g. a held-out split) when given, else from `task`;
    it never repeats a demonstration of its own prompt. n_shots=0 gives zero-shot prompts.
    """
    rng = random.Random(seed)
    prompts = []
    for _ in range(n_prompts):
        if queries is None:
            chosen = task.sample(n_shots + 1, rng)
        else:
            query = rng.choice(queries.pairs)
            demos = [p for p in task.sample(min(n_shots + 1, len(task)), rng) if p[0] != query[0]][:n_shots]
            chosen = [*demos, query]
        prompts.append(build_prompt(tokenizer, chosen, fmt))
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    return PromptBatch.collate(prompts, pad)


def zero_shot_prompts(tokenizer: object, task: Task, n_prompts: int, seed: int = 0, fmt: PromptFormat = PromptFormat()) -> PromptBatch:
    """n_prompts distinct query pairs of the whole `task`, each as its own zero-shot prompt.

    The same sampling as `eval_prompts` (setting 'execution'), on the pairs given rather than a split of them."""
    return _query_prompts(tokenizer, task, n_prompts, random.Random(seed), "execution", fmt)


FAKE_PAIR: tuple[str, str] = ("X", "Y")


def fake_pair_prompts(
    tokenizer: object, task: Task, n_prompts: int, seed: int = 0, fmt: PromptFormat = PromptFormat(),
    fake: tuple[str, str] = FAKE_PAIR,
) -> PromptBatch:
    """Task-detection setting (App. G, Example 4): `<bos>Follow the pattern:\\n{X} -> {Y}\\n{x} ->`.

    Queries from the whole `task`. One uninformative pair precedes each query; steering goes at the fake pair's
    output token (`output_mask('first')`) and the loss is on the query's output. The same sampling as
    `eval_prompts` (setting 'detection'); the package itself evaluates through `eval_prompts`.
    """
    return _query_prompts(tokenizer, task, n_prompts, random.Random(seed), "detection", fmt, fake)


# -- the prompts every steering evaluation is scored on ---------------------------------------------

SETTINGS: tuple[str, ...] = ("execution", "detection")  # zero-shot prompts (steer the query arrow); fake pair first (its output)
SPLITS: tuple[str, ...] = ("eval", "calibration")  # the task's held-out pairs; its training pairs


@dataclass(frozen=True)
class EvalSet:
    """Prompts to steer and score: `batch`, and where the steering goes (`steer_at`, from the setting)."""

    batch: PromptBatch
    setting: str

    @property
    def steer_at(self) -> torch.Tensor:
        """[batch, seq] bool: the query arrow (execution) or the fake pair's output token (detection, App. G)."""
        return self.batch.arrow_mask("last") if self.setting == "execution" else self.batch.output_mask("first")

    def take(self, start: int, stop: int) -> "EvalSet":
        """Prompts start..stop as their own set (re-collated)."""
        return EvalSet(self.batch.slice(start, stop), self.setting)


def eval_prompts(
    tokenizer: object, task: Task, setting: str = "execution", split: str = "eval", n: int = 32, seed: int = 0,
    eval_share: float = DEFAULT_EVAL_SHARE, fmt: PromptFormat = PromptFormat(), fake: tuple[str, str] = FAKE_PAIR, *,
    prompt_seed: int | None = None, valid_only: bool = False,
) -> EvalSet:  # fmt: skip
    """n one-query prompts (zero-shot, or after the fake pair) of the task's held-out pairs ('eval') or of its
    training pairs ('calibration', disjoint from 'eval'), split by task.split(eval_share, seed).

    The pairs: a seeded sample of min(n, pairs) of them (prompt_seed, by default seed + 1 for 'eval' and
    seed + 2 for 'calibration'); with valid_only, the first n of a seeded shuffle that the tokenizer can
    label (pairs it cannot are skipped: fewer than n prompts may come back).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, held_out = task.split(eval_share, seed)
    pairs = held_out if split == "eval" else train
    rng = random.Random((seed + 1 if split == "eval" else seed + 2) if prompt_seed is None else prompt_seed)
    try:
        return EvalSet(_query_prompts(tokenizer, pairs, n, rng, setting, fmt, fake, valid_only=valid_only), setting)
    except _NoValidPrompts:
        kind = "held-out" if split == "eval" else "training"
        raise ValueError(f"task {task.name}: 0 valid {kind} prompts (of {len(pairs)} pairs)") from None


class _NoValidPrompts(ValueError):
    pass


def _query_prompts(
    tokenizer: object, pairs: Task, n: int, rng: random.Random, setting: str, fmt: PromptFormat = PromptFormat(),
    fake: tuple[str, str] = FAKE_PAIR, *, valid_only: bool = False,
) -> PromptBatch:  # fmt: skip
    """The one sampling of one-query prompts (eval_prompts, zero_shot_prompts, fake_pair_prompts): a sample of
    min(n, pairs) of `pairs` drawn with `rng`, each pair as its own prompt (after the fake pair for 'detection');
    with valid_only, the first n of an `rng` shuffle that the tokenizer can label."""
    pad = getattr(tokenizer, "pad_token_id", None) or 0

    def prompt(p: tuple[str, str]) -> Prompt:
        return build_prompt(tokenizer, [p] if setting == "execution" else [fake, p], fmt)

    if not valid_only:
        return PromptBatch.collate([prompt(p) for p in pairs.sample(min(n, len(pairs)), rng)], pad)
    order = list(pairs.pairs)
    rng.shuffle(order)
    prompts = []
    for p in order:
        if len(prompts) == n:
            break
        try:
            prompts.append(prompt(p))
        except ValueError:  # the tokenizer cannot label this pair's tokens
            continue
    if not prompts:
        raise _NoValidPrompts(f"0 valid prompts (of {len(pairs)} pairs)")
    return PromptBatch.collate(prompts, pad)
