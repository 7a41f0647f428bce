"""pymeta.memory.retain_freed_memory: freed activation-sized blocks are reused, not faulted in
again (measured in fresh processes, since the setting is process-wide)."""

import platform
import subprocess
import sys

import pytest

from pymeta.memory import retain_freed_memory

# Like a task of a meta-step: allocates four 16 MiB tensors (activations), touching every page,
# then frees them all; 20 times. Prints the minor page faults of the loop.
SCRIPT = """
import resource, sys, torch
from pymeta.memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
x = torch.ones(4 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    ys = [x * 2 for _ in range(4)]  # fresh 16 MiB blocks, every page written
    del ys
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    round_faults = 4 * 4096  # four blocks of 4096 pages of 4 KiB
    applied, retained = faults("retain")
    assert applied == "True"
    # The first round faults its pages in; every later one reuses them. (glibc's defaults
    # fault 2.5 to 20 rounds' worth here, depending on what else sits on the heap.)
    assert round_faults * 0.9 < retained < round_faults * 1.5


def test_bad_threshold_is_explained():
    with pytest.raises(TypeError, match="trim_threshold: expected an int, received float"):
        retain_freed_memory(1.5)
    with pytest.raises(ValueError, match=r"trim_threshold: expected 0 <= bytes < 2\*\*31"):
        retain_freed_memory(-1)
