"""The fence (processor.py, step 4a): a batch whose partitions another process wrote while it was
being applied writes nothing of itself and is applied again from the watermarks as they are.

One owner per partition is what the ownership rules give a live member; a member frozen longer
than its session timeout (the chaos suite's SIGSTOP scenario) lost its partitions without knowing
and, resumed, goes on with a batch whose new rows it judged before the new owner wrote the same
offsets. Here the freeze is a hook: right after the resumed member selected its batch's new
rows, the new owner applies part of the same messages.
"""

from __future__ import annotations

from typing import Any

import pytest

from aggregators.direct import make_processor, pack
from tests.integration.helpers import egress_events

pytestmark = pytest.mark.clickhouse


def test_a_batch_whose_partition_was_written_meanwhile_is_applied_again(
    clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, db = clickhouse
    events = egress_events("fence-", 100, tenants=1)
    messages = pack(events, partition=0, start_offset=0, per_message=10)  # offsets 0..9
    assert len(messages) == 10
    frozen, owner = make_processor(client, db), make_processor(client, db)
    frozen.process(messages[:3])  # its last batch before the freeze: its watermark cached at 2

    real_select_new = frozen.writer.select_new
    wrote: list[int] = []

    def select_new_then_the_owner_writes(*args: Any, **kwargs: Any) -> None:
        real_select_new(*args, **kwargs)  # the resumed member's new rows: offsets 3..9 look new
        if not wrote:  # meanwhile, the partition's new owner applies offsets 3..6
            wrote.append(owner.process(messages[3:7]).written)

    monkeypatch.setattr(frozen.writer, "select_new", select_new_then_the_owner_writes)
    stats = frozen.process_with_retry(messages[3:])
    assert wrote == [40]
    assert stats is not None and stats.written == 30  # only offsets 7..9 were its own to write
    rows, ids = client.query(f"SELECT count(), uniqExact(tenant, event_id) FROM {db}.events_raw").result_rows[
        0
    ]
    assert (rows, ids) == (100, 100)
    counted = client.query(f"SELECT sum(value_count) FROM {db}.usage_15m").result_rows[0][0]
    assert counted == 100
