"""fastopt.distributed.TorchComm: the sharded optimizer over torch.distributed (gloo on CPU).

Its own file: two processes importing torch take most of a CI minute on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

def test_torch_distributed_communicator():
    """The same sharded step over torch.distributed (gloo, 2 processes): bit-exact parity,
    gather/scatter of the state."""
    pytest.importorskip("torch")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    script = HERE / "mpi" / "torch_comm_cases.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok torch" in out, out[-3000:]
