"""Built-in tasks and user task files."""

from __future__ import annotations

import json

import pytest

from icl_circuits import PAPER_TASKS, TaskFormatError, load_task, load_tasks


def test_paper_tasks_ship_with_enough_clean_pairs():
    assert len(PAPER_TASKS) == 23
    for name in PAPER_TASKS:
        task = load_task(name)
        assert len(task) >= 100, name
        inputs = [x for x, _ in task.pairs]
        assert len(set(inputs)) == len(inputs), f"{name}: duplicate inputs"


def test_algo_tasks_are_seeded_and_correct():
    for name, index in (("algo_first", 0), ("algo_second", 1), ("algo_last", -1)):
        task = load_task(name)
        assert task == load_task(name)  # same seed, same pairs
        for x, y in task.pairs:
            items = x.strip("[]").split(", ")
            assert len(items) == 4 and len(set(items)) == 4
            assert y == items[index]


def test_a_few_known_facts():
    cc = dict(load_task("country_capital").pairs)
    assert cc["France"] == "Paris" and cc["Japan"] == "Tokyo"
    assert dict(load_task("present_simple_past_simple").pairs)["go"] == "went"
    assert dict(load_task("singular_plural").pairs)["mouse"] == "mice"


def test_split_is_disjoint_and_seeded():
    task = load_task("antonyms")
    train, held = task.split(0.25, seed=3)
    assert len(held) == round(len(task) * 0.25) and len(train) + len(held) == len(task)
    assert not set(train.pairs) & set(held.pairs)
    assert task.split(0.25, seed=3) == (train, held)
    assert task.split(0.25, seed=4)[1] != held


def test_user_files_in_every_format_load_the_same(tmp_path):
    pairs = [("hot", "cold"), ("big", "small"), ("United States", "Washington, D.C.")]
    (tmp_path / "a.json").write_text(json.dumps([{"input": x, "output": y} for x, y in pairs]))
    (tmp_path / "b.json").write_text(json.dumps(dict(pairs)))
    (tmp_path / "c.csv").write_text('input,output\nhot,cold\nbig,small\nUnited States,"Washington, D.C."\n')
    (tmp_path / "d.csv").write_text('INPUT, Output\r\nhot , cold\nbig,small\n\nUnited States,"Washington, D.C."\n')
    for f in ("a.json", "b.json", "c.csv", "d.csv"):
        assert load_task(tmp_path / f).pairs == tuple(pairs), f
    assert [t.name for t in load_tasks(f"{tmp_path / 'a.json'},antonyms")] == ["a", "antonyms"]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("e.json", "[]", "no pairs"),
        ("e.json", "{}", "no pairs"),
        ("e.json", "[{\"input\": \"a\"", "invalid JSON"),
        ("e.json", "[{\"input\": \"a\", \"answer\": \"b\"}]", "expected"),
        ("e.json", "[[\"a\", \"b\"]]", "expected"),
        ("e.json", "\"hello\"", "list of pairs or a dict"),
        ("e.json", "{\"a\": \"\"}", "empty output"),
        ("e.json", "{\"a\": 3}", "strings"),
        ("e.json", "{\"a -> b\": \"c\"}", "contains '->'"),
        ("e.json", "{\"a\\nb\": \"c\"}", "contains"),
        ("e.csv", "", "empty CSV"),
        ("e.csv", "input,output\na,b,c\n", "2 columns"),
        ("e.csv", "question,answer\na,b\n", "header row 'input,output', got 'question,answer'"),
        ("e.csv", "hot,cold\nbig,small\n", "header row"),
        ("e.txt", "a,b\n", "must be .json or .csv"),
    ],
)
def test_malformed_task_files_give_clear_errors(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(TaskFormatError, match=match):
        load_task(tmp_path / name)


def test_unknown_task_name():
    with pytest.raises(FileNotFoundError, match="neither a built-in task"):
        load_task("capital_country")


def test_saved_task_reads_back_identically(tmp_path):
    from icl_circuits.data.tasks import Task, save_task

    # repeated inputs and non-ASCII survive (a dict-shaped file would merge the repeats)
    task = Task("mine", (("a", "b"), ("a", "c"), ("été", "summer"), ("x, y", '"q"')))
    assert load_task(save_task(task, tmp_path / "mine.json")) == task


def test_result_folders_prefer_their_own_copy_of_the_task(tmp_path):
    # task_of_result knows the layout of a `clean` result folder, so it lives in the experiments layer
    from icl_circuits.data.tasks import Task, save_task
    from icl_circuits.experiments.clean import TASK_FILE, task_of_result

    task = Task("mine", (("a", "b"), ("a", "c"), ("été", "summer"), ("x, y", '"q"')))
    save_task(task, tmp_path / "mine" / TASK_FILE)
    assert task_of_result(tmp_path / "mine", "mine") == task
    assert task_of_result(tmp_path / "elsewhere", "antonyms") == load_task("antonyms")  # no copy: the built-in
    with pytest.raises(FileNotFoundError, match="neither a built-in task"):
        task_of_result(tmp_path / "elsewhere", "mine")


# -- researchers' own task files (issue 14, section 5) ---------------------------------------------


def _fv_file(tmp_path, n=50):
    """A function-vectors style file (ericwtodd/function_vectors dataset_files/abstractive): a list of
    {"input", "output"} with stray whitespace, and a few pairs that cannot form a prompt."""
    items = [{"input": f"word{i}", "output": f"Wort{i}" + ("\n" if i % 7 == 0 else "")} for i in range(n)]
    items += [{"input": "  spaced  ", "output": "\tok "}]
    items += [{"input": "", "output": "leer"}, {"input": "a -> b", "output": "c"}, {"input": "x", "output": 3},
              {"input": "line\nbreak", "output": "y"}, {"question": "q", "answer": "a"}]  # fmt: skip
    path = tmp_path / "english-german.json"
    path.write_text(json.dumps(items))
    return path, n + 1


def test_function_vector_files_load_with_whitespace_stripped_and_bad_pairs_skipped(tmp_path):
    import warnings

    from icl_circuits.data.tasks import SkippedPairsWarning

    path, good = _fv_file(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = load_task(path)
    assert task.name == "english-german" and len(task) == good
    assert ("word0", "Wort0") in task.pairs and ("spaced", "ok") in task.pairs
    msgs = [str(w.message) for w in caught if issubclass(w.category, SkippedPairsWarning)]
    assert len(msgs) == 1 and "skipped 5 of 56" in msgs[0] and "empty input" in msgs[0] and "--strict" in msgs[0]
    assert msgs[0].count(";") <= 4  # the first few, not all


def test_strict_mode_refuses_a_file_with_unusable_pairs(tmp_path):
    path, _ = _fv_file(tmp_path)
    with pytest.raises(TaskFormatError, match=r"english-german.json: .*5 unusable pair\(s\) \(strict mode\).*empty input"):
        load_task(path, strict=True)
    with pytest.raises(TaskFormatError, match="strict"):
        load_tasks(f"antonyms,{path}", strict=True)
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([{"input": "a ", "output": " b\n"}, {"input": "c", "output": "d"}]))
    assert load_task(clean, strict=True).pairs == (("a", "b"), ("c", "d"))  # whitespace is stripped in both modes


def test_strict_flag_on_the_cli(tmp_path, capsys):
    from icl_circuits.cli import main

    path, _ = _fv_file(tmp_path)
    assert main(["task-vectors", "--tasks", str(path), "--strict", "--model", str(tmp_path / "no_model")]) == 2
    err = capsys.readouterr().err
    assert "english-german.json" in err and "strict" in err and len(err.strip().splitlines()) == 1
    # without --strict the file is accepted; the next failure is the (missing, local) model
    assert main(["task-vectors", "--tasks", str(path), "--model", str(tmp_path / "no_model")]) == 2
    assert "no_model" in capsys.readouterr().err


def test_task_digest_is_content_not_name():
    a = load_task("antonyms")
    assert a.digest == load_task("antonyms").digest
    from icl_circuits.data.tasks import Task, is_builtin

    other = Task("antonyms", (("up", "down"),))
    assert other.digest != a.digest and is_builtin(a) and not is_builtin(other)
