"""Qwen3: LLaMA's module names and gated MLP; RMS norms on the attention's queries and keys
(``q_norm``/``k_norm``) live inside the attention and change nothing editing reads."""

from __future__ import annotations

import dataclasses

from editkit.models.llama import ADAPTER as LLAMA

ADAPTER = dataclasses.replace(LLAMA, name="qwen3")
