"""A sweep's results, chosen on accuracy per compute and not on accuracy alone.

From Tune's ``ResultGrid``: a table of trials (the space's values, steps run, final and best metric,
wall time, compute used = wall time x workers in GPU- or CPU-seconds, studies/s, chunks per worker,
stopped early or not) as CSV and Parquet; the best trial by the metric; the Pareto front of metric
against compute (no other trial is both better and cheaper); the best config as a ready-to-run
training YAML; and two plots: the metric against step per trial, and the metric against compute
with the front marked.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from hlip_ray.config import Config, dump_config, with_values
from hlip_ray.storage import Storage, join

TABLE = "trials"
BEST_CONFIG = "best.yaml"
METRIC_BY_STEP = "metric_by_step.png"
METRIC_VS_COMPUTE = "metric_vs_compute.png"


@dataclass
class Trial:
    trial_id: str
    values: dict
    status: str              # finished | stopped early | failed
    steps: int
    final: float
    best: float
    wall_s: float
    compute_s: float
    studies_per_s: float
    chunks_per_worker: int
    history: list[tuple[int, float]]   # (step, metric) at each validation
    cloned_from: str = ""              # PBT: the checkpoints it continued ("<trial> step <n>; ...")

    def row(self, metric: str, unit: str, front: set[str], best: str | None) -> dict:
        return {"trial": self.trial_id, **self.values, "status": self.status, "steps": self.steps,
                f"final {metric}": self.final, f"best {metric}": self.best, "wall_s": round(self.wall_s, 1),
                f"compute {unit}-s": round(self.compute_s, 1), "studies_per_s": round(self.studies_per_s, 2),
                "chunks_per_worker": self.chunks_per_worker, "cloned_from": self.cloned_from,
                "pareto_front": self.trial_id in front,
                "best": self.trial_id == best}


def trials_of(grid, base: Config, keys: list[str]) -> list[Trial]:
    """One ``Trial`` per result of the sweep."""
    metric, max_steps = base.tune.metric, base.train.max_steps
    trials = []
    for result in grid:
        values = {key: result.config.get(key) for key in keys}
        config = with_values(base, values)
        workers = config.train.num_workers
        workers = max(workers) if isinstance(workers, list) else workers
        history = result.metrics_dataframe
        rows = [] if history is None else history.to_dict("records")
        steps = int(rows[-1].get("step", 0)) if rows else 0
        # A report carries the latest validation: keep the values measured at their step (``val/step``).
        series = [(int(row["step"]), float(row[metric])) for row in rows if _number(row.get(metric))
                  and "step" in row and row.get("val/step") == row["step"]]
        wall = float(rows[-1].get("time_total_s", 0.0)) if rows else 0.0
        rates = [float(row["studies_per_s"]) for row in rows if _number(row.get("studies_per_s"))]
        if result.error is not None:
            status = "failed"
        elif steps < max_steps:
            status = "stopped early"
        else:
            status = "finished"
        values_seen = [value for _, value in series]
        trials.append(Trial(
            trial_id=trial_id(result.path),
            values=values, status=status, steps=steps,
            final=values_seen[-1] if values_seen else math.nan,
            best=(max if base.tune.mode == "max" else min)(values_seen) if values_seen else math.nan,
            wall_s=wall, compute_s=wall * workers,
            studies_per_s=sorted(rates)[len(rates) // 2] if rates else math.nan,
            chunks_per_worker=config.train.global_batch_size // (workers * config.train.chunk_size),
            history=series,
            cloned_from="; ".join(dict.fromkeys(row["cloned_from"] for row in rows
                                                if isinstance(row.get("cloned_from"), str))),
        ))
    return sorted(trials, key=lambda trial: trial.trial_id)


def trial_id(path: str) -> str:
    """A trial's id from its folder (``run_trial_<id>_<n>_<values>_<time>``): not from its metrics, which
    PBT copies from the trial it clones."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    found = re.match(r"run_trial_([0-9a-f]+_\d+)_", name)
    return found.group(1) if found else name


def _number(value) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


def best_trial(trials: list[Trial], mode: str) -> Trial | None:
    """The trial with the best metric over its run (failed trials and trials without one aside)."""
    scored = [trial for trial in trials if trial.status != "failed" and not math.isnan(trial.best)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda trial: trial.best)


def pareto_front(trials: list[Trial], mode: str) -> list[Trial]:
    """Trials that no other trial beats on both the metric (its best) and the compute used."""
    scored = [trial for trial in trials if trial.status != "failed" and not math.isnan(trial.best)]
    sign = 1 if mode == "max" else -1

    def dominated(trial: Trial) -> bool:
        return any(sign * other.best >= sign * trial.best and other.compute_s <= trial.compute_s
                   and (sign * other.best > sign * trial.best or other.compute_s < trial.compute_s)
                   for other in scored)

    return sorted((trial for trial in scored if not dominated(trial)), key=lambda trial: trial.compute_s)


def write_results(grid, base: Config, keys: list[str], folder: str, storage: Storage) -> dict:
    """Write the table, the best config and the plots into ``folder``; returns what was found."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    trials = trials_of(grid, base, keys)
    metric, mode = base.tune.metric, base.tune.mode
    unit = "GPU" if base.train.use_gpu else "CPU"
    best = best_trial(trials, mode)
    front = pareto_front(trials, mode)
    front_ids = {trial.trial_id for trial in front}
    rows = [trial.row(metric, unit, front_ids, best.trial_id if best else None) for trial in trials]
    table = pa.Table.from_pylist(rows)
    for suffix, write in (("csv", pyarrow.csv.write_csv), ("parquet", pyarrow.parquet.write_table)):
        buffer = io.BytesIO()
        write(table, buffer)
        storage.write_bytes(join(folder, f"{TABLE}.{suffix}"), buffer.getvalue())
    written = {"table": join(folder, f"{TABLE}.csv"), "table_parquet": join(folder, f"{TABLE}.parquet")}
    if best is not None:
        config = with_values(base, {**best.values, "train.run_name": f"{base.tune.name}-best"})
        header = (f"# The best trial of sweep {base.tune.name!r} ({best.trial_id}: best {metric} {best.best:.4f}).\n"
                  f"# Train it with: hlip-ray train --config {BEST_CONFIG}\n")
        storage.write_bytes(join(folder, BEST_CONFIG), (header + dump_config(config)).encode())
        written["best_config"] = join(folder, BEST_CONFIG)
    for name, draw in ((METRIC_BY_STEP, _metric_by_step), (METRIC_VS_COMPUTE, _metric_vs_compute)):
        storage.write_bytes(join(folder, name), draw(trials, front_ids, metric, unit))
        written[name.removesuffix(".png")] = join(folder, name)
    return {"trials": trials, "rows": rows, "best": best, "front": front, "unit": unit, "files": written}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.5), dpi=110)


def _png(plt, figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _metric_by_step(trials: list[Trial], front: set[str], metric: str, unit: str) -> bytes:
    plt, figure, axes = _figure()
    for trial in trials:
        if trial.history:
            steps, values = zip(*trial.history)
            axes.plot(steps, values, marker="o", markersize=3,
                      label=f"{trial.trial_id} ({trial.status})", linewidth=2 if trial.trial_id in front else 1)
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per trial")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return _png(plt, figure)


def _metric_vs_compute(trials: list[Trial], front: set[str], metric: str, unit: str) -> bytes:
    plt, figure, axes = _figure()
    scored = [trial for trial in trials if not math.isnan(trial.best)]
    for trial in scored:
        on_front = trial.trial_id in front
        axes.scatter(trial.compute_s, trial.best, s=60 if on_front else 30,
                     color="tab:red" if on_front else "tab:gray", zorder=3)
        axes.annotate(trial.trial_id, (trial.compute_s, trial.best), fontsize=7, xytext=(4, 4),
                      textcoords="offset points")
    line = sorted((trial for trial in scored if trial.trial_id in front), key=lambda trial: trial.compute_s)
    if line:
        axes.plot([trial.compute_s for trial in line], [trial.best for trial in line], color="tab:red",
                  linestyle="--", label="Pareto front", zorder=2)
        axes.legend(fontsize=8)
    axes.set_xlabel(f"compute used ({unit}-seconds)")
    axes.set_ylabel(f"best {metric}")
    axes.set_title(f"{metric} against compute")
    axes.grid(alpha=0.3)
    return _png(plt, figure)


def results_summary(found: dict, base: Config) -> dict:
    """The results as a program reads them (``hlip-ray tune --json``): a row per trial as in the table, the best
    trial, the Pareto front's trials and the files written."""
    best = found["best"]
    return {"sweep": base.tune.name, "metric": base.tune.metric, "mode": base.tune.mode, "trials": found["rows"],
            "best": best.trial_id if best else None, "pareto_front": [trial.trial_id for trial in found["front"]],
            "files": found["files"]}


def summary_lines(found: dict, base: Config, keys: list[str]) -> list[str]:
    """The results as a person reads them: one line per trial, then the best trial and the front."""
    metric, unit = base.tune.metric, found["unit"]
    best = found["best"]
    front = {trial.trial_id for trial in found["front"]}
    lines = [f"sweep {base.tune.name}: {len(found['trials'])} trials, {metric} ({base.tune.mode}), "
             f"compute in {unit}-seconds ('*' best, 'F' on the Pareto front)"]
    header = ["trial", *keys, "status", "steps", f"best {metric}", f"{unit}-s", "studies/s"]
    table = [header]
    for trial in found["trials"]:
        mark = ("*" if best and trial.trial_id == best.trial_id else "") + ("F" if trial.trial_id in front else "")
        table.append([f"{trial.trial_id} {mark}".rstrip(), *(str(trial.values[key]) for key in keys), trial.status,
                      str(trial.steps), f"{trial.best:.4f}", f"{trial.compute_s:.0f}", f"{trial.studies_per_s:.1f}"])
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    if best is not None:
        lines.append(f"best: {best.trial_id} ({' '.join(f'{k}={v}' for k, v in best.values.items())}), "
                     f"{metric} {best.best:.4f} for {best.compute_s:.0f} {unit}-s")
    lines.append("Pareto front (cheapest first): " + ", ".join(
        f"{trial.trial_id} {trial.best:.4f} @ {trial.compute_s:.0f} {unit}-s" for trial in found["front"]))
    lines += [f"{name}: {path}" for name, path in found["files"].items()]
    return lines
