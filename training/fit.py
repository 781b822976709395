"""`python -m training.fit`: train prompt sets for the tasks (domains) of a data root.

    python -m training.fit --data ROOT [--tasks a,b,c] [--method mmap] [--groups auto|one|none|FILE]
        [--model NAME --pretrained TAG|PATH] [--shots K | --fraction F] [--epochs E] --out DIR

Groups (`--groups`):
- `auto`: docs/method.md's gradient-driven grouping runs first (`training.group`; its groups.json and
  heatmap go to the run directory); `--num-groups K` fixes the number of groups.
- `one`: one group holding every task.
- `none`: task modules only. Every task is then independent, so each task is saved as its own
  prompt set (a set can be swapped in the service without touching the others).
- FILE: a groups.json (`groups`: lists of task names); tasks it does not list get task modules only.
All groups are trained jointly (one multi-task run, every task's loss every step), then saved as
ONE prompt set per group — the group module plus its tasks' modules — named after the group's
tasks (e.g. `sketch-quickdraw`), in `--out`, in `mmap_model`'s prompt-set format, with each
task's test accuracy (and zero-shot alongside) and provenance (command, seed, code version,
data summary, training settings). `--out` is what the service loads.

Calibration (docs/method.md, "Calibrated scores and abstention"): after training, each task's
temperature is fitted on its validation split (NLL, one scalar per task) and stored with the
task; the evaluation records accuracy, NLL and ECE on the test split before and after, and the run
directory gets `reliability.png`. `--no-calibrate` skips it (temperatures stay 1);
`--target-precision P` also stores per task the smallest `min_score` whose validation precision
over the answered images is at least P.

The run directory (`--run-dir`, default `<out>.run`) holds metrics.jsonl, the per-epoch
checkpoints (`--resume` continues from the newest), the grouping and the reliability diagram.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from dataclasses import asdict
from pathlib import Path

from mmap_model.prompts import check_name
from mmap_model.promptset import CONFIG_FILE

from . import cli
from .calibrate import fit_tasks, measure, reliability_figure, task_scores
from .classifiers import PromptClassifier
from .configs import HelpFormatter
from .data import data_summary
from .dist import shutdown
from .steps import (
    build_prompts,
    resolve_groups,
    score_test_split,
    split_into_sets,
    train_prompts,
    write_samples,
)
from .trainer import TrainConfig, autocast_factory

log = logging.getLogger(__name__)


def run_files(run_dir: Path) -> list[Path]:
    """What a training run leaves in its run directory (checkpoints, metrics, grouping)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for pattern in ("checkpoint-*", "metrics.jsonl", "groups.json", "groups.png")
                  for p in run_dir.glob(pattern) if p.is_file())


def existing_sets(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob(f"*/{CONFIG_FILE}")) if out.is_dir() else []


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m training.fit", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    cli.add_data_args(parser)
    cli.add_backbone_args(parser)
    cli.add_prompt_args(parser)
    cli.add_train_args(parser)
    parser.add_argument("--groups", default="auto", help="auto | one | none | path to a groups.json")
    parser.add_argument("--no-task-modules", action="store_true", help="group modules only (the '-MT' baselines)")
    cli.add_grouping_args(parser, count_flag="--num-groups")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory of prompt sets to write (what the service loads)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="checkpoints, metrics.jsonl, groups.json (default <out>.run)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest (or this) checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prompt sets of the same names in --out (other sets there are never touched) "
                             "and start afresh in a used --run-dir")
    parser.add_argument("--samples", type=int, default=0,
                        help="copy this many test images per task into <set>/samples/<task>/")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="do not fit the tasks' temperatures on the validation split (they stay 1)")
    parser.add_argument("--target-precision", type=float, default=None, metavar="P",
                        help="store per task the smallest min_score whose validation precision (over the answered "
                             "images) is >= P")
    parser.add_argument("--name", default=None, type=check_name,
                        help="name of the prompt set written (with several sets, their prefix: <name>-<group>); "
                             "default: the group's name, 'all' for --groups one")
    args = cli.parse_args(parser, argv)
    if args.groups not in ("auto", "one", "none") and not Path(args.groups).is_file():
        parser.error(f"--groups: {args.groups!r} is neither auto, one, none nor an existing groups.json")
    if args.no_task_modules and args.groups == "none":
        parser.error("--no-task-modules needs groups (auto, one or a file)")
    if args.target_precision is not None and not 0 < args.target_precision <= 1:
        parser.error("--target-precision must be in (0, 1]")
    if args.target_precision is not None and not args.calibrate:
        parser.error("--target-precision needs calibration (drop --no-calibrate)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    stale = existing_sets(args.out)  # only to ask for --overwrite: a run never removes a set it does not write
    if stale and not args.overwrite:
        parser.error(f"{args.out} already holds prompt sets ({', '.join(p.name for p in stale)}); pass --overwrite to "
                     "replace those this run writes (the others stay as they are)")
    run_dir = args.run_dir or args.out.with_name(args.out.name + ".run")
    earlier = [] if args.resume else run_files(run_dir)
    if earlier and not args.overwrite:
        parser.error(f"{run_dir} holds another run's files ({', '.join(p.name for p in earlier[:4])}); "
                     "pass --resume to continue it or --overwrite to start afresh")
    cli.setup_logging()
    run = cli.prepare(args)
    prompt_cfg, train_cfg = cli.prompt_config(args), cli.train_config(args)
    progress = not args.quiet
    if run.dist.main:
        for f in earlier:  # --overwrite without --resume: a fresh run must not mix with (or resume) the old one
            f.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    groups, grouping = resolve_groups(args.groups, run, prompt_cfg, train_cfg, args, run_dir, progress)
    prompts = build_prompts(run, prompt_cfg, groups, not args.no_task_modules, train_cfg.seed)
    with cli.user_errors():
        classifier, result = train_prompts(run, prompts, train_cfg, run_dir, args.resume, progress, label="fit")
    scores = score_test_split(run, classifier, train_cfg)
    shutdown(run.dist)  # the collectives are over; only rank 0 writes
    if not run.dist.main:
        return []
    calibration = calibrate(run, classifier, train_cfg, args, run_dir) if args.calibrate else {}
    provenance = {
        "command": cli.command_line("training.fit", argv), "seed": train_cfg.seed, "code_version": cli.code_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data": data_summary(args.data, run.tasks, run.split, train_cfg.seed, args.classnames),
        "train": asdict(train_cfg),
        "world_size": run.dist.world, "groups": groups,
        "grouping": None if grouping is None else {k: v for k, v in grouping.to_json().items() if k != "ranking"},
        "result": {"steps": result.steps, "train_seconds": round(result.train_seconds, 2),
                   "images_per_second": round(result.images_per_second, 1),
                   "val_accuracy": result.history[-1].get("val_acc") if result.history else None},
    }
    written = []
    args.out.mkdir(parents=True, exist_ok=True)
    fitted = {t: (c["temperature"], c["min_score"]) for t, c in calibration.items()}
    sets = split_into_sets(run, prompts, groups, fitted)
    for key, ps in sets.items():
        if args.name:
            ps.name = check_name(args.name if len(sets) == 1 else f"{args.name}-{key}")
        ps.provenance = provenance
        ps.evaluation = {"split": "test", "accuracy": {t: scores["prompted"][t] for t in ps.tasks},
                         "zero_shot": {t: scores["zero_shot"][t] for t in ps.tasks},
                         "test_images": {t: len(run.sets["test"][t]) for t in ps.tasks}}
        if calibration:
            ps.evaluation["calibration"] = {t: calibration[t] for t in ps.tasks}
        fill = (lambda d, tasks=list(ps.tasks): write_samples(d, run, tasks, args.samples)) if args.samples else None
        written.append(ps.publish(args.out, fill=fill))  # replaces a set of the same name; nothing else
    report = {p.name: json.loads((p / CONFIG_FILE).read_text())["evaluation"] for p in written}
    print(json.dumps({"out": str(args.out), "prompt_sets": report}, indent=2))
    return written


def calibrate(run: cli.Run, classifier: PromptClassifier, train_cfg: TrainConfig, args: argparse.Namespace,
              run_dir: Path) -> dict[str, dict]:
    """Per task: the temperature (and with --target-precision the min_score) fitted on the validation split, and
    accuracy, NLL and ECE on the test split before and after; the reliability diagram goes to the run directory."""
    val = {t: s for t, s in run.sets.get("val", {}).items() if len(s)}
    if not val:
        log.warning("no validation images (--val-fraction 0): temperatures stay 1")
        return {}
    autocast = autocast_factory(train_cfg.amp, run.dist.device)
    fitted = fit_tasks(task_scores(classifier, val, train_cfg.eval_batch_size, autocast), args.target_precision)
    test = task_scores(classifier, run.sets["test"], train_cfg.eval_batch_size, autocast)
    out = {}
    for task, entry in fitted.items():
        out[task] = {**entry, "split": "test", **measure(test[task], entry["temperature"])}
    reliability_figure({t: [(test[t], out[t]["temperature"])] for t in out}, run_dir / "reliability.png",
                       title="test split, before and after temperature scaling")
    return out


if __name__ == "__main__":
    main()
