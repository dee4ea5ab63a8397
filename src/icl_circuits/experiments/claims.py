"""The claims table: each of the paper's findings, the paper's figure, ours from a reproduce run, and whether it holds.

Every claim reads the files its stage wrote (stage names as in recipes/paper.toml) and applies a rule
fixed before looking at our numbers, stated next to the verdict:
- "most tasks" claims: **yes** for a majority of the tasks measured, **partly** for at least one, **no** for none;
- numeric claims: the rule in the row (e.g. "at most 60 nodes on most tasks").
A claim whose stage did not run says "not run" and why. A recipe that runs none of the stages the claims
read (recipes/saes.toml: the SAE suite) has no claims table: its report says so and lists its stages.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Claim:
    key: str
    where: str  # the paper's section / figure
    text: str
    paper: str  # the paper's figure (Gemma 1 2B)
    stages: tuple[str, ...]  # the stages whose files it reads
    rule: str
    judge: Callable[[dict[str, Path]], tuple[str, str]]  # stage folders -> (ours, verdict)


class Missing(Exception):
    """A file a claim needs is not there (its stage has not run)."""


def _json(path: Path) -> Any:
    if not path.is_file():
        raise Missing(str(path))
    return json.loads(path.read_text())


def _csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise Missing(str(path))
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise Missing(f"{folder}/{pattern}")
    return found[0]


def most(k: int, n: int) -> str:
    """The rule for 'most tasks' claims."""
    if n == 0:
        return "not measured"
    return "yes" if k > n / 2 else ("partly" if k > 0 else "no")


# -- the judges: stage folders -> (ours, verdict) --------------------------------------------------------


def tv_layer(f: dict[str, Path]) -> tuple[str, str]:
    from icl_circuits.methods.task_vectors import LayerSweep

    rows = _result(LayerSweep, f["task_vectors"] / "sweep.json").rows
    layers = sorted({r["layer"] for r in rows})
    mean = {l: statistics.mean(r["relative_loss_decrease"] for r in rows if r["layer"] == l) for l in layers}
    best = max(mean, key=mean.__getitem__)
    lo, hi = layers[0], layers[-1]
    frac = (best - lo) / max(hi - lo, 1)
    n_tasks = len({r["task"] for r in rows})
    ours = f"layer {best} of {lo}-{hi} (mean relative loss decrease {mean[best]:.3f}, {n_tasks} tasks)"
    return ours, "yes" if 0.25 <= frac <= 0.75 else "no"


def tvc(f: dict[str, Path]) -> tuple[str, str]:
    rows = [r for r in _json(f["tvc_execution"] / "summary.json") if r.get("task") != "mean"]
    n = len(rows)
    keep = [r["tvc"] >= 0.9 * r["tv"] for r in rows]
    fewer = [r["l0_tvc"] <= 0.5 * r["l0_tv"] for r in rows]
    beats = [r["tvc"] > max(r["sae_reconstruction"], r["ito_5"], r["ito_20"]) for r in rows]
    allk = sum(a and b and c for a, b, c in zip(keep, fewer, beats))
    cut = 1 - statistics.median(r["l0_tvc"] / max(r["l0_tv"], 1) for r in rows)
    ours = (f"{allk} of {n} tasks meet all three; median {100 * cut:.0f}% fewer latents "
            f"({statistics.median(r['l0_tv'] for r in rows):g} → {statistics.median(r['l0_tvc'] for r in rows):g}); "
            f"effect {statistics.mean(r['tvc'] for r in rows):.3f} vs the TV's {statistics.mean(r['tv'] for r in rows):.3f}; "
            f"beats SAE rec. and ITO-5/20 on {sum(beats)}")  # fmt: skip
    return ours, most(allk, n)


def _masses(f: dict[str, Path], role: str, token: str) -> tuple[str, str]:
    from icl_circuits.methods.masses import MASS_TYPES, MassesResult, mean_masses

    rows = [r for r in _result(MassesResult, f["detectors"] / "masses.json").rows if r["total_mass"] > 0]
    shares = {rl: mean_masses(rows, rl) for rl in (role, f"top_{role}") if any(r["role"] == rl for r in rows)}
    if not shares:
        raise Missing(f"{role} masses")
    head = f"top_{role}" if f"top_{role}" in shares else role
    share = shares[head]
    biggest = max(MASS_TYPES, key=share.__getitem__)
    ours = f"{100 * share[token]:.1f}% for the top {role}s" if head != role else f"{100 * share[token]:.1f}%"
    if role in shares and head != role:
        ours += f" ({100 * shares[role][token]:.1f}% for all cleaned features)"
    verdict = "yes" if share[token] > 0.5 else ("partly" if biggest == token else "no")
    return ours, verdict


def executor_mass(f: dict[str, Path]) -> tuple[str, str]:
    return _masses(f, "executor", "arrow")


def detector_mass(f: dict[str, Path]) -> tuple[str, str]:
    return _masses(f, "detector", "output")


def _specific(folder: Path) -> tuple[str, str]:
    rows = _csv(_one(folder, "*_specificity.csv"))
    k = sum(r["specific"] == "True" for r in rows)
    empty = sum(not r["top_feature"] for r in rows)
    ours = f"{k} of {len(rows)} tasks" + (f"; {empty} with no feature left after cleaning" if empty else "")
    return ours, most(k, len(rows))


def specific_executors(f: dict[str, Path]) -> tuple[str, str]:
    return _specific(f["heatmap_execution"])


def specific_detectors(f: dict[str, Path]) -> tuple[str, str]:
    return _specific(f["heatmap_detection"])


def _result(cls: Any, path: Path) -> Any:
    """A typed result read through its writer's own loader (`from_dict`, which checks the file's schema)."""
    return cls.from_dict(_json(path), str(path))


def negative(f: dict[str, Path]) -> tuple[str, str]:
    from icl_circuits.methods.negative import NegativeResult

    r = _result(NegativeResult, f["negative_steering"] / "negative.json")
    k = 0
    for j, feat in enumerate(r.features):
        worst = r.tasks[int(r.drop[:, j].argmax())]
        k += worst in r.owners.get(feat, [])
    n = len(r.features)
    return f"{k} of {n} executors hurt their own task most", most(k, n)


def link(f: dict[str, Path]) -> tuple[str, str]:
    from icl_circuits.methods.link import LinkResult

    r = _result(LinkResult, f["detectors"] / "link.json")
    own, best = [], 0.0
    for i, t in enumerate(r.detector_tasks):
        if t not in r.executor_tasks:
            continue
        row = r.drop[i].tolist()
        o = row[r.executor_tasks.index(t)]
        own.append(o >= max(row))
        best = max(best, o)
    k, n = sum(own), len(own)
    verdict = most(k, n)
    if verdict == "yes" and best < 0.5:
        verdict = "partly"
    return f"own executor drops most for {k} of {n} detectors; largest own drop {best:.2f}", verdict


def _nodes(folder: Path, limit: int) -> tuple[str, str]:
    rows = [_json(p) for p in sorted(folder.glob("*/summary.json"))]
    if not rows:
        raise Missing(f"{folder}/*/summary.json")
    reached = sorted(r["nodes_for_target"] for r in rows if r.get("nodes_for_target") is not None)
    n = len(rows)
    within = sum(x <= limit for x in reached)
    ours = f"reached by {len(reached)} of {n} tasks" + (f" ({reached[0]:,}-{reached[-1]:,} feature nodes, median {statistics.median(reached):,.0f})" if reached else "")
    verdict = most(within, n)
    if verdict == "no" and reached:
        verdict = "no (reached, but with more nodes)" if len(reached) > n / 2 else "no"
    return ours, verdict


def sfc_11_12(f: dict[str, Path]) -> tuple[str, str]:
    return _nodes(f["circuits"], 60)


def sfc_10_17(f: dict[str, Path]) -> tuple[str, str]:
    return _nodes(f["circuits_10_17"], 1000)


def _cross(folder: Path) -> tuple[str, str]:
    from icl_circuits.methods.circuits import CrossTask

    ct = _result(CrossTask, folder / "cross_task.json")
    tasks = ct.tasks

    def hurt_most(a: str) -> bool:
        row = ct.change[tasks.index(a)]
        return all(row[tasks.index(a)] <= c for c in row)

    done = [a for a in tasks if ct.reached.get(a)]
    if not done and tasks:  # the experiment's condition was never met: say what ablating everything did
        own = [ct.change[i][i] for i in range(len(tasks))]
        return (f"no task's circuit brings its faithfulness down to {ct.target:g}: ablating all of a task's positive-effect feature "
                f"nodes changes its own by {min(own):+.2f} to {max(own):+.2f}; its own task is hurt most for "
                f"{sum(map(hurt_most, tasks))} of {len(tasks)}"), most(0, 0)  # fmt: skip
    k = sum(map(hurt_most, done))
    return f"{k} of {len(done)} tasks whose circuit reached the target hurt themselves most ({len(tasks)} tasks)", most(k, len(done))


def cross_task(f: dict[str, Path]) -> tuple[str, str]:
    return _cross(f["circuits"])


def cross_task_10_17(f: dict[str, Path]) -> tuple[str, str]:
    return _cross(f["circuits_10_17"])


def ie_quality(f: dict[str, Path]) -> tuple[str, str]:
    d = _json(f["ie_quality"] / "ie_correlations.json")
    by = d["by_layer"]
    ours = ", ".join(f"r {r['r']:.2f} at layer {r['layer']} ({r['n']} nodes)" for r in by)
    if by and "r_with_errors" in by[0]:
        ours += f"; {d['all'][0]['r_with_errors']:.2f} with error nodes pooled in"
    return ours, "yes" if by and all(r["r"] >= 0.4 for r in by) else "no"


def detection_layer(f: dict[str, Path]) -> tuple[str, str]:
    from icl_circuits.methods.task_vectors import DetectionSweep, LayerSweep

    det = _result(DetectionSweep, f["detection_sweep"] / "detection_sweep.json").rows
    tv = _result(LayerSweep, f["task_vectors"] / "sweep.json").rows

    def best(rows: list[dict]) -> int:
        layers = sorted({r["layer"] for r in rows})
        return max(layers, key=lambda l: statistics.mean(r["relative_loss_decrease"] for r in rows if r["layer"] == l))

    d, e = best(det), best(tv)
    return f"detection peaks at layer {d}, execution at layer {e}", "yes" if d < e else "no"


CLAIMS: tuple[Claim, ...] = (
    Claim("tv_layer", "Sec. 2.3, Fig. 2", "the task vector works best at a middle layer", "layer 12 of 18",
          ("task_vectors",), "best mean layer in the middle half of the swept layers", tv_layer),
    Claim("detection_layer", "App. G", "task detection peaks at an earlier layer than task execution", "detection 10-11, execution 12",
          ("detection_sweep", "task_vectors"), "best detection layer < best task-vector layer", detection_layer),
    Claim("tvc", "Sec. 3.1, Fig. 2", "TVC keeps the TV's effect with 50-80% fewer latents and beats SAE reconstruction and ITO",
          "most tasks", ("tvc_execution",),
          "per task: TVC ≥ 0.9 × TV, ≤ half the latents of SAE(TV), above SAE rec., ITO-5 and ITO-20; on most tasks", tvc),
    Claim("executor_mass", "Table 1", "executors' activation mass sits on arrow tokens", "89.8%", ("detectors",),
          "yes if > 50% on arrows, partly if arrows are the largest share", executor_mass),
    Claim("detector_mass", "Table 2", "detectors' activation mass sits on output tokens", "96.8%", ("detectors",),
          "yes if > 50% on outputs, partly if outputs are the largest share", detector_mass),
    Claim("specific_executors", "Sec. 3.2, Fig. 22", "most tasks have a task-specific executor", "most tasks", ("heatmap_execution",),
          "top feature's own effect > 0.05 and ≥ 2 × its effect on any other task; on most tasks", specific_executors),
    Claim("specific_detectors", "Sec. 3.2, Fig. 10", "most tasks have a task-specific detector", "most tasks", ("heatmap_detection",),
          "as for executors, on fake-pair prompts", specific_detectors),
    Claim("negative", "App. F.1, Fig. 23", "removing an executor breaks its own task", "yes", ("negative_steering",),
          "the largest accuracy drop is on a task the feature belongs to, for most top executors", negative),
    Claim("link", "Sec. 4.2, Fig. 11", "ablating a detector lowers its own task's executor", "drops up to 1", ("detectors",),
          "own executor drops most for most detectors; yes needs an own drop ≥ 0.5 somewhere, else partly", link),
    Claim("sfc_11_12", "Sec. 4.1.3, Fig. 7", "SFC at layers 11-12: few nodes reach faithfulness 0.6", "10-60 nodes", ("circuits",),
          "most tasks reach 0.6 with ≤ 60 feature nodes", sfc_11_12),
    Claim("sfc_10_17", "Sec. 4.1.3", "SFC at layers 10-17: nodes for faithfulness 0.6", "~500 nodes", ("circuits_10_17",),
          "most tasks reach 0.6 with ≤ 1,000 feature nodes (2 × ~500)", sfc_10_17),
    Claim("cross_task", "Sec. 4.1.3, Fig. 8", "layers 11-12: ablating a task's circuit hurts that task more than others", "yes",
          ("circuits",), "own faithfulness change ≤ every other task's, for most tasks whose ablation reached the target", cross_task),
    Claim("cross_task_10_17", "Sec. 4.1.3, Fig. 8", "layers 10-17: ablating a task's circuit hurts that task more than others", "yes",
          ("circuits_10_17",), "as at layers 11-12", cross_task_10_17),
    Claim("ie_quality", "App. E, Fig. 20-21", "IE estimates correlate with real single-node ablation effects", "r 0.4-0.7",
          ("ie_quality",), "Pearson r ≥ 0.4 over feature nodes at every layer measured", ie_quality),
)  # fmt: skip


def judge_all(folders: dict[str, Path], statuses: dict[str, str]) -> list[dict]:
    """One row per claim: ours and the verdict, or why it was not measured; none for a recipe without any
    stage a claim reads (another experiment than the paper's, e.g. recipes/saes.toml)."""
    if not any(s in folders for c in CLAIMS for s in c.stages):
        return []
    rows = []
    for c in CLAIMS:
        absent = [s for s in c.stages if s not in folders or (statuses.get(s) != "done" and not folders[s].is_dir())]
        unfinished = [s for s in c.stages if s in folders and statuses.get(s) != "done" and s not in absent]
        if absent:
            why = ", ".join(f"{s} ({'not in the recipe' if s not in folders else statuses.get(s, 'not run')})" for s in absent)
            ours, verdict = f"stage {why}", "not run"
        else:
            try:  # an unfinished (interrupted) stage is judged on the files it has finished, and says so
                ours, verdict = c.judge(folders)
                if unfinished:
                    ours += f" [stage {', '.join(unfinished)} unfinished: from the units it has written so far]"
            except Missing as e:
                ours, verdict = f"missing file {e}" + (f" (stage {', '.join(unfinished)} unfinished)" if unfinished else ""), "not run"
        rows.append(dict(key=c.key, claim=c.text, where=c.where, paper=c.paper, ours=ours, holds=verdict, rule=c.rule,
                         stages=list(c.stages)))  # fmt: skip
    return rows


# -- the report ------------------------------------------------------------------------------------------


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it lies inside it (reports do not name the machine's folders)."""
    try:
        return Path(path).absolute().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def write_claims_report(recipe: Any, result: Any, tasks: str, cfg: Any) -> tuple[list[dict], Path]:
    """<docs>/report.md and report.html: the claims table first, then each stage's figures, the tasks and wall times."""
    from icl_circuits.viz.report import Section, write_report
    from icl_circuits.experiments.reproduce import save_manifest
    from icl_circuits.core.storage import atomic_write_text, write_json
    from icl_circuits.data.tasks import list_tasks, load_tasks

    docs = Path(result.docs)
    docs.mkdir(parents=True, exist_ok=True)
    folders = {s.name: Path(result.out) / s.name for s in recipe.stages}
    statuses = {s.name: s.status for s in result.stages}
    from icl_circuits.experiments.reproduce import _cosmetic

    out = _shown(Path(result.out))  # the run folder as the user would type it (relative to the working folder)
    commands = {s.name: "icl-circuits " + " ".join(_cosmetic(s.argv)).replace(str(result.out), out) for s in result.stages}
    rows = judge_all(folders, statuses)
    write_json(docs / "claims.json", rows)
    save_manifest(result, recipe, tasks, cfg)
    builtin = set(list_tasks())
    names = [t.name for t in load_tasks(tasks)]
    yours = [n for n in names if n not in builtin]

    md = [f"# {recipe.title}", "",
          f"Model `{cfg.model}`, recipe `{recipe.path.name}` (digest {recipe.digest}), seed {cfg.seed}, {cfg.device}/{cfg.dtype}. "
          f"Made by `icl-circuits reproduce --recipe {cfg.recipe} --out {out}`; every row names the stage whose command "
          "made it (the commands are listed below and in manifest.json).", "",
          "## Claims", ""]  # fmt: skip
    no_claims = (f"None: recipe `{recipe.path.name}` runs none of the stages the paper's claims read "
                 "(icl_circuits/experiments/claims.py); its results are the files of the stages below.")  # fmt: skip
    if rows:
        md += ["| claim | where in the paper | paper (Gemma 1 2B) | ours | holds? | rule | stage |", "|---|---|---|---|---|---|---|"]
    else:
        md += [no_claims]
    for r in rows:
        md.append("| " + " | ".join(_md_cell(x) for x in (r["claim"], r["where"], r["paper"], r["ours"], f"**{r['holds']}**",
                                                           r["rule"], ", ".join(r["stages"]))) + " |")  # fmt: skip
    md += ["", f"## Tasks ({len(names)})", "",
           ", ".join(f"{n} (yours)" if n in yours else n for n in names), ""]  # fmt: skip
    if yours:
        md += [f"{len(yours)} task(s) come from your files: {', '.join(yours)}.", ""]
    claims_section = (Section("Claims", table=[{k: r[k] for k in ("claim", "where", "paper", "ours", "holds", "rule")} for r in rows])
                      if rows else Section("Claims", text=no_claims))  # fmt: skip
    sections_html = [claims_section,
                     Section(f"Tasks ({len(names)})", text=", ".join(f"{n} (yours)" if n in yours else n for n in names))]  # fmt: skip
    for st in recipe.stages:
        imgs = sorted(p.relative_to(docs).as_posix() for p in (docs / st.name).rglob("*.png")) if (docs / st.name).is_dir() else []
        md += [f"## {st.section} {st.title or st.name}".replace("  ", " "), ""]
        md += [f"Stage `{st.name}` ({statuses.get(st.name, 'not run')}):", "", "```", commands.get(st.name, ""), "```", ""]
        if st.note:
            md += [st.note, ""]
        md += [f"![{p}]({p})" for p in imgs] + ([""] if imgs else [])
        sections_html.append(Section(f"{st.section} {st.title or st.name}",
                                     text=f"{statuses.get(st.name, 'not run')}: {commands.get(st.name, '')}" + (f" — {st.note}" if st.note else ""),
                                     images=imgs))  # fmt: skip
    times = [dict(stage=s.name, status=s.status, minutes=round(s.seconds / 60, 1)) for s in result.stages]
    total = sum(s.seconds for s in result.stages) / 60
    md += ["## Wall time per stage", "", f"Threads: {cfg.threads or 'torch default'}; summed over every attempt (an interrupted "
           "and resumed stage counts both).", "", "| stage | status | minutes |", "|---|---|---:|"]  # fmt: skip
    md += [f"| {t['stage']} | {t['status']} | {t['minutes']} |" for t in times] + [f"| **total** | | **{total:.1f}** |", ""]
    sections_html.append(Section("Wall time per stage", table=times))
    atomic_write_text(docs / "report.md", "\n".join(md))
    report = write_report(docs, recipe.title, sections_html)
    return rows, report


def claims_markdown(rows: Sequence[dict]) -> str:
    """The measured claims, one line each, and how many the recipe did not measure (for the CLI's closing print)."""
    if not rows:
        return "  (none: this recipe runs none of the stages the paper's claims read; its results are in the report)"
    measured = [r for r in rows if r["holds"] != "not run"]
    width = max((len(r["claim"]) for r in measured), default=0)
    lines = [f"  {r['holds']:>8s}  {r['claim']:{width}s}  ours: {r['ours']}" for r in measured]
    if len(measured) < len(rows):
        lines.append(f"  ({len(rows) - len(measured)} more claims need stages this run did not do: "
                     f"{', '.join(r['key'] for r in rows if r['holds'] == 'not run')}; `make paper` runs them all)")  # fmt: skip
    return "\n".join(lines)
