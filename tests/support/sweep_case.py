"""A case of the compatibility sweep (a tiny configuration, its inputs, the full-size arguments), and
the inputs that diffusers' classes and FastVideo's DiTs of the same family share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    init: dict | None = None  # None: no tiny configuration yet, only the full-size share is checked
    inputs: Callable[[], dict] | None = None
    full: dict = field(default_factory=dict)  # only where the class's defaults do not build it
    xfail: str | None = None


def r(*shape):
    return torch.randn(*shape)


def t(*values):
    return torch.tensor(values)


def _flux_ids(h, w, text, dims=3):
    img = torch.zeros(h * w, dims)
    img[:, 1] = torch.arange(h).repeat_interleave(w)
    img[:, 2] = torch.arange(w).repeat(h)
    return img, torch.zeros(text, dims)


def flux_inputs(pooled=None, guidance=False):
    img, txt = _flux_ids(4, 4, 8)
    x = dict(hidden_states=r(1, 16, 4), encoder_hidden_states=r(1, 8, 32), img_ids=img, txt_ids=txt,
             timestep=t(0.5))
    if pooled:
        x["pooled_projections"] = r(1, pooled)
    if guidance:
        x["guidance"] = t(3.5)
    return x


def flux2_inputs():
    img = torch.cartesian_prod(t(0), torch.arange(4), torch.arange(4), t(0))[None]
    txt = torch.cartesian_prod(t(0), t(0), t(0), torch.arange(8))[None]
    return dict(hidden_states=r(1, 16, 4), encoder_hidden_states=r(1, 8, 32), img_ids=img, txt_ids=txt,
                timestep=t(0.5), guidance=t(1.0))


def video_inputs(c=4, f=2, h=8, w=8, text=16, seq=8, **extra):
    return dict(hidden_states=r(1, c, f, h, w), encoder_hidden_states=r(1, seq, text), timestep=t(500), **extra)


def minimax_h3_inputs(text=4, audio=6, video=8):
    # one packed sequence: text, audio, then video rows, each tagged (0 video, 1 text, 2 audio)
    n = text + audio + video
    text_i, audio_i, video_i = torch.arange(text), torch.arange(text, text + audio), torch.arange(text + audio, n)
    tags = torch.zeros(n, dtype=torch.long)
    tags[text_i], tags[audio_i] = 1, 2
    timestep_indices = torch.zeros(n, dtype=torch.long)
    timestep_indices[audio_i] = 1
    position_ids = torch.zeros(n, 3)
    position_ids[:, 0] = torch.arange(n)
    position_ids[video_i, 1] = torch.arange(video) % 4.0
    position_ids[video_i, 2] = torch.arange(video) % 2.0
    return dict(hidden_states=r(1, video, 16), audio_hidden_states=r(1, audio, 6), encoder_hidden_states=r(1, text, 8),
                timestep=t(0.7, 0.3), timestep_indices=timestep_indices, token_tags=tags, position_ids=position_ids,
                video_indices=video_i, audio_indices=audio_i, text_indices=text_i)
