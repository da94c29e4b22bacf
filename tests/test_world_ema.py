"""The world base's weight average (no host)."""

import pytest
import torch

from locref_core.world.base import EMA


def test_ema_ramps_up_then_averages_with_its_decay():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # n = 1: decay min(0.9, 2 / 11)
    assert ema.shadow[0] == pytest.approx(torch.full((3,), 1 - 2 / 11))
    for _ in range(200):
        ema.update()
    assert ema.shadow[0] == pytest.approx(torch.ones(3), abs=1e-6)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()  # late: the full decay
    assert ema.shadow[0] == pytest.approx(torch.full((3,), 1.0 + 0.1), abs=1e-5)
    ema.copy_to_params()
    assert torch.equal(p.detach(), ema.shadow[0]) and p.requires_grad
