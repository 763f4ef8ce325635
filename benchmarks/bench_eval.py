"""`lorakit eval` on the toy world: how long it takes, and whether its scores say what the toy metrics say (issue 17).

    python benchmarks/bench_eval.py                  # timing: base + 10 checkpoints x 64 samples, toy classifier
    python benchmarks/bench_eval.py --check          # the toy-world checks (several minutes, see below)
    python benchmarks/bench_eval.py --docs_images docs/images   # timing, then the README's eval chart and sheet

On a shared machine, time with --threads 1: the toy model is dominated by per-op overhead (as in `lorakit demo`), and
two threads that wait on other processes can make the run ten times slower than one.

Both train what they need once in --work_dir (cached; not timed): what `lorakit demo` trains (lorakit/toyworld/recipe.py:
15 images x 20 repeats, the trained trigger vector and the five-class reg images, 300 steps) saving every 30 steps,
and for --check also a deliberately over-trained run of seed 001's recipe as written: one image x 300 repeats, 750
steps, saved every epoch.

--check prints and stores in --work_dir/check.json:
- agreement: Spearman's rank correlation between eval's concept recall of the demo run's 10 checkpoints and
  the toy classifier's fidelity of the same files (lorakit.toyworld.quality: its own prompts and seeds), for eval's
  defaults (scene tags: the demo captions' backgrounds, the classifier's declared contexts; the reason is stored)
  and for eval asked for the toy metric's contexts (--scene_tags "sky, forest, room, night, beach, hat");
  also the recall of the toy metric's character tags alone, and the toy fidelity against itself on other seeds (the
  most any independent measurement can agree);
- memorisation: eval's copy rate and flags on the over-trained run's checkpoints vs the demo run's;
- drift trend: Spearman between the step and eval's prior/pixel drift, next to the toy metrics' bleed (1 - unrelated
  kept) and pixel change for the same checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def train_run(work: Path, name: str) -> Path:
    """The run's output folder, trained unless its final LoRA exists."""
    from lorakit import options as O
    from lorakit.toyworld.datasets import write_dreambooth_folder
    from lorakit.toyworld.pretrain import default_base_path
    from lorakit.toyworld.recipe import PIVOTAL_EPOCHS, PIVOTAL_REG, usu_bear_argv, write_dataset
    from lorakit.train.trainer import train

    out = work / name
    if (out / "output" / "usu_bear.safetensors").is_file():
        return out
    if name == "demo":  # what `lorakit demo` trains (its documented variant), saved every 30 of its 300 steps
        data = write_dataset(out / "dataset", reg=PIVOTAL_REG, base=default_base_path())
        argv = usu_bear_argv(default_base_path(), data, out / "output", epochs=PIVOTAL_EPOCHS, pivotal=True)
        argv += ["--save_every_n_steps", "30"]
    else:  # one image seen 3,000 times by seed 001's recipe as written: the LoRA should copy it
        data = write_dreambooth_folder(out / "dataset", n_train=1, n_reg=0, train_repeats=300)
        argv = usu_bear_argv(default_base_path(), data, out / "output") + ["--save_every_n_epochs", "1"]
    argv += ["--num_threads", "1"]  # as the demo: its figures are those of a one-thread run
    print(f"training {name} (not timed) ...", flush=True)
    train(O.resolve(argv), progress=False)
    return out


def eval_argv(run: Path, seeds: int, extra=()) -> list[str]:
    from lorakit.toyworld.pretrain import default_base_path

    return ["eval", "--model", str(default_base_path()), "--lora_dir", str(run / "output"), "--loras", "usu_bear*",
            "--train_data_dir", str(run / "dataset" / "train"), "--tagger", "toy", "--cfg_scale", "5",
            "--seeds", str(seeds), "--no_progress", *extra]


def run_eval(run: Path, seeds: int, outdir: Path, extra=(), reuse: bool = False) -> dict:
    """`lorakit eval` of a run; with `reuse`, an earlier result of the same command line is read instead, if it read
    the same concept (a change of eval's defaults changes the prompts without changing the command line)."""
    from lorakit.cli.main import main
    from lorakit.eval.report import read_result

    argv = eval_argv(run, seeds, ["--outdir", str(outdir), *extra])
    done = outdir / "argv.json"
    if reuse and done.is_file() and json.loads(done.read_text()) == argv:
        old = read_result(outdir / "usu_bear_eval.json")
        if _same_concept(old["concept"], run, extra):
            return old
    rc = main(argv)
    if rc:
        raise SystemExit(f"lorakit eval failed ({rc})")
    done.write_text(json.dumps(argv))
    return read_result(outdir / "usu_bear_eval.json")


def _same_concept(old: dict, run: Path, extra) -> bool:
    """Whether eval would read the same trigger, core and scene tags from the run's data now (a second or two)."""
    from lorakit.eval.concept import find_concept, split_list, training_images
    from lorakit.eval.taggers import load_tagger

    scenes = split_list(extra[extra.index("--scene_tags") + 1]) if "--scene_tags" in extra else 3
    now = find_concept(training_images(run / "dataset" / "train"), load_tagger("toy"), scene_tags=scenes)
    return all(old.get(k) == getattr(now, k) for k in ("trigger", "core_tags", "scene_tags"))


def timing(work: Path) -> dict:
    run = train_run(work, "demo")
    t = time.perf_counter()
    cpu = time.process_time()
    res = run_eval(run, 8, work / "timing")
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    n = len(res["rows"]) - 1
    out = {"checkpoints": n, "samples_per_model": res["samples_per_model"], "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1), "threads": _threads(), "phases_s": res["timing"],
           "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(out, indent=1))
    return out


def docs_images(outdir: Path, dest: Path) -> None:
    """The README's chart and sheet from a timing run's outputs (the README's command): the chart drawn again from
    the JSON, the sheet in 256 colours (a third of the size; the toy world's flat colours lose nothing)."""
    from PIL import Image

    from lorakit.eval.report import chart, read_result

    dest.mkdir(parents=True, exist_ok=True)
    chart(read_result(outdir / "usu_bear_eval.json")).save(dest / "eval_demo_chart.png", optimize=True)
    sheet = Image.open(outdir / "usu_bear_eval_sheet.png").convert("RGB")
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        dest / "eval_demo_sheet.png", optimize=True)
    print(f"written {dest / 'eval_demo_chart.png'}, {dest / 'eval_demo_sheet.png'}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


TOY_SCENES = "sky, forest, room, night, beach, hat"  # the toy metric's composed trigger prompts (quality.py)
TOY_CHARACTER = ("bear", "black fur", "crescent marking")  # what the toy metric's fidelity reads as the character


def toy_metrics(work: Path, rows: list[dict], seeds: int, seed: int, scenes: list[str] | None = None) -> dict:
    """lorakit.toyworld.quality's scores of each checkpoint (cached in --work_dir); `scenes` replaces its composed
    trigger prompts ("usu bear, <background>", "usu bear, hat") with "usu bear, <scene>" (fidelity only)."""
    from dataclasses import dataclass

    from lorakit.toyworld.quality import QualityEvaluator, QualitySettings

    @dataclass(frozen=True)
    class Scenes(QualitySettings):
        def prompt_sets(self):
            return {"trigger": [("usu bear", {})] + [(f"usu bear, {s}", {}) for s in scenes]}

    tail = ("" if seed == 5000 else f"_seed{seed}") + ("_" + "_".join(s.replace(" ", "-") for s in scenes)
                                                       if scenes else "")
    cache = work / f"quality_{seeds}{tail}.json"
    quality = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [r for r in rows if r["name"] not in quality]
    if missing:
        settings = (Scenes(seeds=seeds, seed=seed, sets=("trigger",)) if scenes
                    else QualitySettings(seeds=seeds, seed=seed))
        qe = QualityEvaluator(settings=settings)
        for r in missing:
            if scenes:  # the trigger set alone: fidelity is all that is read
                imgs = qe.lora_images(r["path"])
                pred = qe.classifier.predict(imgs, value_range=(-1, 1))
                quality[r["name"]] = {"fidelity": float(sum(pred["character"]["labels"]) / len(imgs))}
            else:
                q = qe.evaluate(r["path"])
                quality[r["name"]] = {"fidelity": q.fidelity, "bleed_agreement": q.bleed_agreement,
                                      "bleed_pixel_change": q.bleed_pixel_change, "prior_agreement": q.prior_agreement}
            print(f"toy metrics (seed {seed}{', eval contexts' if scenes else ''}) {r['name']}: "
                  f"{quality[r['name']]}", flush=True)
            cache.write_text(json.dumps(quality, indent=1))
    return quality


def _agreement(rows: list[dict], fidelity: list[float]) -> dict:
    from lorakit.eval.scores import spearman

    toy_recall = [sum(r["core_tag_recall"].get(t, 0.0) for t in TOY_CHARACTER) / len(TOY_CHARACTER) for r in rows]
    return {"spearman_recall_vs_fidelity": round(spearman([r["concept_recall"] for r in rows], fidelity), 3),
            "spearman_tag_recall_vs_fidelity": round(spearman([r["tag_recall"] for r in rows], fidelity), 3),
            "spearman_full_match_vs_fidelity": round(spearman([r["full_match"] for r in rows], fidelity), 3),
            "spearman_tag_recall_of_toy_character_tags_vs_fidelity": round(spearman(toy_recall, fidelity), 3),
            "recall": [r["concept_recall"] for r in rows], "recall_of_toy_character_tags": [round(v, 4) for v in
                                                                                           toy_recall]}


def check(work: Path, seeds: int, quality_seeds: int) -> dict:
    from lorakit.eval.scores import spearman

    demo, over = train_run(work, "demo"), train_run(work, "overfit")
    res_demo = run_eval(demo, seeds, work / "check_demo", reuse=True)
    res_toy = run_eval(demo, seeds, work / "check_demo_toy_scenes", ["--scene_tags", TOY_SCENES], reuse=True)
    res_over = run_eval(over, seeds, work / "check_overfit", reuse=True)
    rows = [r for r in res_demo["rows"] if not r["is_base"]]
    rows_toy = [r for r in res_toy["rows"] if not r["is_base"]]
    quality = toy_metrics(work, rows, quality_seeds, 5000)
    reseeded = toy_metrics(work, rows, quality_seeds, 6000)
    # the toy fidelity in eval's default contexts ("usu bear, small", ...): does the ranking follow the contexts?
    in_eval_contexts = toy_metrics(work, rows, quality_seeds, 5000, res_demo["concept"]["scene_tags"])
    steps = [r["step"] for r in rows]
    fidelity = [quality[r["name"]]["fidelity"] for r in rows]
    over_rows = [r for r in res_over["rows"] if not r["is_base"]]
    out = {
        "eval_seeds": seeds, "quality_seeds": quality_seeds, "steps": steps,
        "toy_fidelity": [round(f, 4) for f in fidelity],
        "toy_fidelity_other_seeds": [round(reseeded[r["name"]]["fidelity"], 4) for r in rows],
        "agreement": {
            # the ceiling: the toy metric against itself on other seeds
            "spearman_toy_fidelity_vs_itself_other_seeds": round(spearman(
                fidelity, [reseeded[r["name"]]["fidelity"] for r in rows]), 3),
            "eval_defaults": {"core_tags": res_demo["concept"]["core_tags"],
                              "scene_tags": res_demo["concept"]["scene_tags"],
                              "scene_reason": res_demo["concept"].get("scene_reason"), **_agreement(rows, fidelity)},
            "eval_defaults_vs_toy_fidelity_in_the_same_contexts": {
                "toy_fidelity": [round(in_eval_contexts[r["name"]]["fidelity"], 4) for r in rows],
                **_agreement(rows, [in_eval_contexts[r["name"]]["fidelity"] for r in rows])},
            "eval_toy_scene_tags": {"core_tags": res_toy["concept"]["core_tags"],
                                    "scene_tags": res_toy["concept"]["scene_tags"], **_agreement(rows_toy, fidelity)}},
        "memorisation": {
            "overfit": [{"step": r["step"], "copy_rate": r["copy_rate"], "diversity": r["diversity"],
                         "flags": r["flags"], "memorised": r["memorised"]} for r in over_rows],
            "demo": [{"step": r["step"], "copy_rate": r["copy_rate"], "diversity": r["diversity"],
                      "memorised": r["memorised"]} for r in rows],
            "overfit_final_flagged": over_rows[-1]["memorised"],
            "overfit_flagged": [r["name"] for r in over_rows if r["memorised"]],
            "demo_flagged": [r["name"] for r in rows if r["memorised"]]},
        "drift": {
            "spearman_step_vs_prior_drift": round(spearman(steps, [r["prior_drift"] for r in rows]), 3),
            "spearman_step_vs_pixel_drift": round(spearman(steps, [r["pixel_drift"] for r in rows]), 3),
            "spearman_step_vs_toy_bleed": round(spearman(steps, [1 - quality[r["name"]]["bleed_agreement"]
                                                                   for r in rows]), 3),
            "spearman_step_vs_toy_pixel_change": round(spearman(steps, [quality[r["name"]]["bleed_pixel_change"]
                                                                          for r in rows]), 3),
            "per_checkpoint": [{"step": r["step"], "prior_drift": r["prior_drift"], "pixel_drift": r["pixel_drift"],
                           "toy_bleed": round(1 - quality[r["name"]]["bleed_agreement"], 3),
                           "toy_pixel_change": round(quality[r["name"]]["bleed_pixel_change"], 3)} for r in rows]},
        "recommended": res_demo["recommended"], "pareto": res_demo["pareto"],
    }
    (work / "check.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "bench_eval"), help="trained runs and outputs (cached)")
    p.add_argument("--check", action="store_true", help="the toy-world checks instead of the timing")
    p.add_argument("--seeds", type=int, default=32, help="--check: eval samples per prompt (default 32)")
    p.add_argument("--quality_seeds", type=int, default=32, help="--check: toy-metric samples per prompt (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the CPU cores)")
    p.add_argument("--docs_images", metavar="DIR", help="after the timing run, write the README's eval chart and "
                   "sheet of the demo into DIR (docs/images)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if a.check:
        return check(work, a.seeds, a.quality_seeds)
    out = timing(work)
    if a.docs_images:
        docs_images(work / "timing", Path(a.docs_images))
    return out


if __name__ == "__main__":
    main()
