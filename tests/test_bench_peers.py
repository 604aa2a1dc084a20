"""bench/peers.py: every peer is a row and a column whatever happens to it: timed and checked
when it runs, flagged when its values are not ours, a reason when it cannot run."""

import torch
from peers import Peer, PeerUnavailable, peer_tables


def _inputs(n, device, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g, dtype=dtype).requires_grad_()
    y = torch.randn(n, 8, generator=g, dtype=dtype).requires_grad_()
    return x, y


def _loss(x, y):
    return torch.logsumexp(x @ y.T, dim=1).mean()


def _unavailable(device):
    raise PeerUnavailable("CUDA only: test reason")


def _broken_import(device):
    raise ImportError("no module named peer_package")


PEERS = [
    Peer("ours", lambda device: _loss),
    Peer("same", lambda device: lambda x, y: torch.logsumexp(y @ x.T, dim=0).mean()),
    Peer("twice", lambda device: lambda x, y: 2 * _loss(x, y)),
    Peer("gpu-only", _unavailable),
    Peer("broken", _broken_import),
]


def test_every_peer_has_a_check_row_and_a_cell_per_size():
    written = []
    lines = peer_tables("t", "note", PEERS, _inputs, [16, 32], "cpu", torch.float32, written.append)
    checks = {
        line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and " | " in line
    }
    assert "same (" in checks["ours"] and "same (" in checks["same"]
    assert "DIFFERS" in checks["twice"]
    assert "CUDA only: test reason" in checks["gpu-only"]
    assert "cannot start: ImportError: no module named peer_package" in checks["broken"]
    rows = [line for line in lines if line.startswith(("| 16 |", "| 32 |"))]
    assert len(rows) == 2
    for row in rows:
        cells = row.strip("| ").split(" | ")[1:]
        assert len(cells) == len(PEERS)
        assert cells[1].endswith("x ours") and cells[2].endswith("DIFFERS")
        assert cells[3] == "cannot run: CUDA only: test reason"
        assert cells[4].startswith("cannot run: cannot start: ImportError")
    assert written and written[-1] == lines
