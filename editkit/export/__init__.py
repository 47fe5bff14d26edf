"""Exports of editkit patches to other libraries' formats (PEFT LoRA adapters)."""

from __future__ import annotations

from editkit.export.peft import patch_to_peft

__all__ = ["patch_to_peft"]
