"""Typed helpers: one method per usage event type, shared by the sync and the asyncio client.

Each builds the event (``metering_client.prepare.new_event``: a fresh UUID as its id unless one is
given, the time now unless given) and hands it to the client's ``emit``. Give a stable ``id`` when
the same usage may be reported twice (after a crash of the reporting service): an id is counted
once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from metering_client.events import EventType

R = TypeVar("R")
When = datetime | str | None


class UsageHelpers(Generic[R]):
    def _emit_usage(self, type: EventType, data: Mapping[str, Any], time: When, id: str | None) -> R:
        raise NotImplementedError

    def ci_step_cpu(
        self,
        *,
        contract_id: str,
        workspace_id: str,
        step_id: str,
        cpu_seconds: float,
        time: When = None,
        id: str | None = None,
    ) -> R:
        data = {
            "contract_id": contract_id,
            "workspace_id": workspace_id,
            "step_id": step_id,
            "cpu_seconds": cpu_seconds,
        }
        return self._emit_usage(EventType.CI_STEP_CPU, data, time, id)

    def ci_step_memory(
        self,
        *,
        contract_id: str,
        workspace_id: str,
        step_id: str,
        memory_mib: float,
        time: When = None,
        id: str | None = None,
    ) -> R:
        data = {
            "contract_id": contract_id,
            "workspace_id": workspace_id,
            "step_id": step_id,
            "memory_mib": memory_mib,
        }
        return self._emit_usage(EventType.CI_STEP_MEMORY, data, time, id)

    def workstation_cpu(
        self, *, workstation_id: str, cpu_seconds: float, time: When = None, id: str | None = None
    ) -> R:
        data = {"workstation_id": workstation_id, "cpu_seconds": cpu_seconds}
        return self._emit_usage(EventType.WORKSTATION_CPU, data, time, id)

    def workstation_gpu(
        self, *, workstation_id: str, gpu_seconds: float, time: When = None, id: str | None = None
    ) -> R:
        data = {"workstation_id": workstation_id, "gpu_seconds": gpu_seconds}
        return self._emit_usage(EventType.WORKSTATION_GPU, data, time, id)

    def workstation_memory(
        self, *, workstation_id: str, memory_gb: float, time: When = None, id: str | None = None
    ) -> R:
        data = {"workstation_id": workstation_id, "memory_gb": memory_gb}
        return self._emit_usage(EventType.WORKSTATION_MEMORY, data, time, id)

    def render_completed(
        self,
        *,
        workspace_id: str,
        render_id: str,
        output_duration_seconds: float,
        time: When = None,
        id: str | None = None,
    ) -> R:
        data = {
            "workspace_id": workspace_id,
            "render_id": render_id,
            "output_duration_seconds": output_duration_seconds,
        }
        return self._emit_usage(EventType.RENDER_COMPLETED, data, time, id)

    def ai_task_submitted(
        self, *, workspace_id: str, task_id: str, task_type: str, time: When = None, id: str | None = None
    ) -> R:
        data = {"workspace_id": workspace_id, "task_id": task_id, "task_type": task_type}
        return self._emit_usage(EventType.AI_TASK_SUBMITTED, data, time, id)

    def egress_download(
        self, *, workspace_id: str, artifact_id: str, bytes: int, time: When = None, id: str | None = None
    ) -> R:
        data = {"workspace_id": workspace_id, "artifact_id": artifact_id, "bytes": bytes}
        return self._emit_usage(EventType.EGRESS_DOWNLOAD, data, time, id)

    def datastream_rows(
        self,
        *,
        workspace_id: str,
        total_rows: int,
        row_keys: Sequence[str] = (),
        datastream_id: str | None = None,
        time: When = None,
        id: str | None = None,
    ) -> R:
        data: dict[str, Any] = {
            "workspace_id": workspace_id,
            "total_rows": total_rows,
            "row_keys": list(row_keys),
        }
        if datastream_id is not None:
            data["datastream_id"] = datastream_id
        return self._emit_usage(EventType.DATASTREAM_ROWS, data, time, id)

    def gateway_request(
        self,
        *,
        workspace_id: str,
        virtual_key_id: str,
        request_id: str,
        model: str | None = None,
        status_code: int | None = None,
        time: When = None,
        id: str | None = None,
    ) -> R:
        data: dict[str, Any] = {
            "workspace_id": workspace_id,
            "virtual_key_id": virtual_key_id,
            "request_id": request_id,
        }
        if model is not None:
            data["model"] = model
        if status_code is not None:
            data["status_code"] = status_code
        return self._emit_usage(EventType.GATEWAY_REQUEST, data, time, id)
