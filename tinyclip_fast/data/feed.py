"""Batches onto the training device: the host-to-device copy of batch k+1 runs while step k
computes, the device half of the image pipeline runs there, and the time spent waiting for the
loader is measured.

On CUDA the copy goes through pinned memory on a side stream: ``next(feed)`` makes the compute
stream wait for batch k's copy, queues its augmentation, then takes batch k+1 from the loader
(the only place the training process can wait for data: ``wait`` seconds) and starts its copy.
Elsewhere the batch is moved (and augmented) when it is taken. The :class:`DeviceAugment`
fields that hold per-sample parameters stay on the host.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from tinyclip_fast.data.device_augment import DeviceAugment


class DeviceFeed:
    """``next(feed)``: the loader's next batch on ``device``, augmented when ``augment`` is
    given; ``feed.wait``: seconds that call spent blocked on the loader."""

    def __init__(
        self,
        batches: Iterator[dict[str, Any]],
        device: torch.device,
        augment: DeviceAugment | None = None,
    ) -> None:
        self.batches, self.device, self.augment = batches, torch.device(device), augment
        self.host_fields = augment.host_fields if augment is not None else ()
        self.wait = 0.0
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._next: dict[str, Any] | None = None

    def __iter__(self) -> DeviceFeed:
        return self

    def __next__(self) -> dict[str, Any]:
        self.wait = 0.0
        if self.stream is None:
            batch = self._move(self._take())
        else:
            if self._next is None:
                self._next = self._copy_ahead(self._take())
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            batch, self._next = self._next, None
            for value in batch.values():
                if value.device.type == "cuda":
                    value.record_stream(current)
        batch = self.augment(batch) if self.augment is not None else batch
        if self.stream is not None:
            try:
                self._next = self._copy_ahead(self._take())
            except StopIteration:  # a finite loader: this was its last batch
                pass
        return batch

    def _take(self) -> dict[str, Any]:
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait += time.perf_counter() - start
        return batch

    def _move(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            key: value if key in self.host_fields else value.to(self.device, non_blocking=True)
            for key, value in batch.items()
        }

    def _to_pin(self, key: str, value: torch.Tensor) -> bool:
        return key not in self.host_fields and value.device.type == "cpu" and not value.is_pinned()

    def _copy_ahead(self, batch: dict[str, Any]) -> dict[str, Any]:
        pinned = {
            key: value.pin_memory() if self._to_pin(key, value) else value
            for key, value in batch.items()
        }
        with torch.cuda.stream(self.stream):
            return self._move(pinned)
