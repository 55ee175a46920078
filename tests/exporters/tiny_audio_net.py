"""A custom PyTorch audio model, as a user would write one (tests load it by module:callable)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TinyAudioNet(nn.Module):
    """Waveform (batch, samples) -> frames (batch, frames, dim): two strided convolutions."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, kernel_size=25, stride=10)
        self.conv2 = nn.Conv1d(16, dim, kernel_size=5, stride=4)
        self.head = nn.Linear(dim, dim)

    def forward(self, waveform: Any) -> Any:
        x = torch.relu(self.conv1(waveform[:, None, :]))
        x = torch.relu(self.conv2(x)).transpose(1, 2)
        return self.head(x)
