"""heap.py: a CPU run's freed memory is reused by the next step instead of being fresh pages.

Each case runs in a fresh interpreter, so that glibc's malloc starts from its defaults (its
mmap threshold moves with what a process has freed). Page faults are counted with getrusage;
a 4 KB page touched for the first time is one minor fault."""

import json
import platform
import subprocess
import sys

import pytest

from grpo_ensemble import RewardScorer, train
from grpo_ensemble.trainer import heap

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

MB = 1 << 20
SIZES = [1, 2, 4, 8, 16]  # MB: each block above the threshold glibc had moved to before it
PAGES = sum(SIZES) * MB // 4096  # 7936 pages in one round

SCRIPT = """
import json, resource, sys, torch
from grpo_ensemble.trainer.heap import kept_between_steps

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def round_():  # a "step": blocks allocated, every page written, freed
    before = faults()
    for mb in SIZES:
        block = torch.empty(mb << 20, dtype=torch.uint8)
        block.fill_(1)
        del block
    return faults() - before

with kept_between_steps(on=sys.argv[1] == "keep"):
    first, second = round_(), round_()
third = round_()
print(json.dumps([first, second, third]))
""".replace("SIZES", repr(SIZES))


def rounds(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_kept_memory_is_reused_and_given_back_after():
    # (the first round may find free memory left by imports: not asserted)
    _, second, third = rounds("keep")
    assert second < 0.05 * PAGES  # the same blocks again: the pages the first round freed
    # after the block, free pages went back to the OS: at least the largest block's (16 MB)
    assert third >= 0.5 * PAGES


def test_without_it_the_second_round_faults_again():
    # glibc's defaults: each block above the moving threshold is a fresh mapping, and the
    # heap's blocks of the second round are new pages too
    _, second, _ = rounds("default")
    assert second >= 0.4 * PAGES  # the heap grew to the largest block: about 16 of 31 MB


class HeapWitness(RewardScorer):
    """Scores 0 and notes, at each step's scoring, whether the heap settings were in force."""

    name = "heap_witness"

    def __init__(self):
        self.seen = []

    def score(self, samples):
        self.seen.append(heap.kept)
        return [0.0] * len(samples)


def test_a_cpu_run_keeps_freed_memory_during_its_steps_only(small_recipe):
    recipe = small_recipe(eval__before=False, eval__after=False)
    witness = HeapWitness()
    assert not heap.kept
    train(recipe, reward_scorers=[(witness, 1.0)])
    # scored twice a step: the policy's candidates, then the peer's
    assert witness.seen == [True] * 2 * recipe.train.steps
    assert not heap.kept  # given back when the steps end
