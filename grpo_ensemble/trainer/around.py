"""What a run does around its steps, for one policy (`loop`) and for co-trained policies
(`coloop`) alike: a step that a stop signal cuts short, the checkpoint a schedule, a signal or
an alert asks for, the final model, the disk space the checkpoints need, the data report.

The checkpoint functions take a run (`setup.Run`) or a co-training team (`cotrain.Team`):
each offers `run_dir`, `recipe`, `engine` (a team: every policy's) and `sampler`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from .. import dist, stopping
from ..errors import AlertStopped, Interrupted, UserError
from ..models.adapters import merged_state_dict
from ..models.zero import gathered_params
from ..rundir import rows_up_to, write_file, write_recipe
from .checkpoint import (
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside_later,
)
from .console import say
from .evaluation import EvalResult
from .setup import Run
from .step import grpo_step


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    metrics: list[dict]  # the steps this call ran (after the resumed step, when resuming)
    before: EvalResult | None = None
    after: EvalResult | None = None
    resumed_from: Path | None = None
    # co-training: each policy's own result (its rows unprefixed, its model in final/<name>)
    policies: dict[str, TrainResult] = field(default_factory=dict)


@dataclass
class Where:
    """Where the run is, for the line a stop signal ends it with."""

    during: str = "start-up"
    kept: str = "nothing was trained"
    checkpoint: Path | None = None  # the newest one of the run, to continue from


def history(where: Where, start: int, part: str = "") -> list[dict]:
    """The metrics rows of the steps a resumed run already has (every rank gets rank 0's),
    for the alert rules' history. `part`: a co-trained policy's folder in the checkpoint."""
    rows: list[dict] = []
    ckpt = where.checkpoint
    source = ckpt / part / "metrics.jsonl" if ckpt is not None else None
    if start and dist.is_main() and source is not None and source.is_file():
        rows = [json.loads(line) for line in rows_up_to(source, start)]
    return dist.all_gather_objects(rows)[0] if dist.world_size() > 1 else rows


def save_final(run: Run, model_dir: Path) -> None:
    """The trained policy and its tokenizer in Hugging Face format (rank 0 writes): with
    adapters, the PEFT adapter folder (and, with train.save_merged, the merged model in
    `merged/`)."""
    module = run.engine.module
    with gathered_params(module), _written_here(module):  # ZeRO-3 holds shards: whole weights
        if dist.is_main():
            if run.adapter is None:
                module.save_pretrained(model_dir, safe_serialization=True)
            else:
                run.adapter.save_pretrained(model_dir, safe_serialization=True)
                if run.recipe.train.save_merged:
                    merged = merged_state_dict(module)
                    module.save_pretrained(model_dir / "merged", state_dict=merged)
                    run.tokenizer.save_pretrained(model_dir / "merged")
            run.tokenizer.save_pretrained(model_dir)
    dist.barrier()  # no rank goes on before the final model is on disk


@contextlib.contextmanager
def _written_here(module):
    """transformers' `save_pretrained` writes only on the process of global rank 0; the first
    rank of a co-trained policy placed on its own ranks (`placement: split`) need not be it,
    and only the first rank of the ranks the block is `within` calls it here."""
    if dist.global_rank() == dist.rank():
        yield
        return
    module.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del module.should_save_on_this_rank


def checkpoint_or_stop(run: Run, step: int, fired, where: Where, saved: int) -> int:
    """The checkpoint after `step` when one is due, a stop signal came, or an alert asks for
    it; then the stop a signal or an alert with action `stop` asks for (every rank raises,
    rank 0 prints). Returns the step of the newest checkpoint."""
    t = run.recipe.train
    halt = next((a for a in fired if a.action == "stop"), None)
    wanted = any(a.action in ("checkpoint", "stop") for a in fired)
    due = t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.steps)
    signum = int(dist.all_max([stopping.requested() or 0])[0]) or None
    if due or signum or wanted:
        path = save_checkpoint(run.run_dir, run.engine, run.sampler.state(), run.recipe, step)
        saved = step
        where.checkpoint, where.kept = path, f"the last checkpoint is {path}"
    if signum:
        name = signal.Signals(signum).name
        exc = Interrupted(
            f"stopped by {name} after step {step}; checkpoint {path}", exit_code=128 + signum
        )
        exc.agreed = True
        raise exc
    if halt is not None:
        exc = AlertStopped(
            f"stopped by the alert {halt.rule} after step {step} ({halt.message}); "
            f"checkpoint {path}"
        )
        exc.agreed = True
        raise exc
    return saved


def step_or_stop(run: Run, step: int, saved: int, where: Where, on_rollout=None, stepper=grpo_step):
    """`grpo_step` (or co-training's `stepper`); when a stop signal abandons a reward
    scorer's call in it (a clean `Stop`: nothing of the step has changed the weights yet), a
    checkpoint of the state before the step, from the sampler's and RNGs' states as the step
    began."""
    before = run.sampler.state(), rng_state()
    try:
        return stepper(run, step, on_rollout)
    except stopping.Stop as stop:
        if not stop.clean:
            raise
        previous = step - 1
        if previous > saved:
            sampler, rng = before
            path = save_checkpoint(run.run_dir, run.engine, sampler, run.recipe, previous, rng)
            where.checkpoint, where.kept = path, f"checkpoint {path}"
        where.during = (
            f"step {step} (the reward scorer {stop.waiting_on!r} had not returned "
            f"{stopping.GRACE_S:g} s after it; it was abandoned and the step left out)"
        )
        raise


# bytes a checkpoint takes per parameter, at most: fp32 weights, fp32 master copy, two Adam moments
CHECKPOINT_BYTES_PER_PARAM = 16


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_disk_space(run: Run) -> None:
    """Refuse to start when the run directory cannot hold the checkpoints the recipe keeps
    (the newest K plus the one being written; with `checkpoint_every: 0`, the one a stop
    signal writes)."""
    t = run.recipe.train
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters())
    count = t.keep_checkpoints + 1 if t.checkpoint_every else 1
    need = n_params * CHECKPOINT_BYTES_PER_PARAM * count
    free = free_bytes(run.run_dir)
    if free < need:
        what = (
            f"{count} checkpoints of {n_params:,} parameters need"
            if count > 1
            else f"a checkpoint of {n_params:,} parameters (written on a stop signal) needs"
        )
        fewer = "lower train.keep_checkpoints, " if count > 1 else ""
        raise UserError(
            f"output_dir: {free / 1e9:.2f} GB free in {str(run.run_dir)!r}, but {what} about "
            f"{need / 1e9:.2f} GB; free space, {fewer}or choose another output_dir"
        )


def write_data_report(run: Run, console) -> None:
    """`data_report.json` in the run directory; a line on the console for each source that
    lost or changed rows (skipped bad rows, dropped duplicates, prompts cut to fit)."""
    rows = []
    for r in run.data_reports:
        rows.append(
            {
                "source": r.source,
                "kept": r.kept,
                "skipped": dict(r.skipped),
                "first_skipped": r.first,
                "duplicates": r.duplicates,
                "truncated": r.truncated,
            }
        )
        if r.skipped or r.duplicates or r.truncated:
            say(console, f"data: {r.summary()}")
    write_file(run.run_dir / "data_report.json", json.dumps(rows, indent=1) + "\n")


def resume_from(run: Run, resume: str, result: TrainResult, console, where: Where) -> int:
    """Restore the checkpoint `resume` names (if any) into `run` (a co-training team: every
    policy); returns the step it ends."""
    main, run_dir, start = dist.is_main(), run.run_dir, 0
    path = dist.agree(lambda: find_checkpoint(run_dir, resume))
    if path is not None:
        start = load_checkpoint(path, run.engine, run.sampler, run.recipe)
        run.restored(path, start)
        result.resumed_from = where.checkpoint = path
        where.kept = f"the checkpoints are as they were; the newest is {path}"
        say(console, f"resumed from {path} (step {start})")
        # later checkpoints belong to the way the run went before; kept, under another name
        later = dist.agree(lambda: set_aside_later(run_dir, start) if main else [])
        for moved in later or []:
            say(console, f"a later checkpoint of the earlier run is now {moved}")
    # only now: a checkpoint that refused this recipe leaves the run's own recipe in place
    dist.agree(lambda: write_recipe(run_dir, run.recipe) if main else None)
    return start
