"""The watch over each step of a shard (factory/engine/watch.py): its record and its deadline, in-process."""

import time

import pytest

from factory.engine.watch import DEFAULT_BASE_S, DEFAULT_PER_ROW_S, ShardTimeout, Watch, read_attempt
from factory.output.layout import OutputStore

pytestmark = pytest.mark.timeout(60)


def test_a_step_leaves_its_record_and_a_step_past_its_deadline_raises_in_process(tmp_path):
    watch = Watch(str(tmp_path), {}, timeout_s=0.5, end_process=False)
    with watch.step(7, "synth", rows=10):
        seen = read_attempt(OutputStore(str(tmp_path)), 7)
    assert seen["step"] == "synth" and seen["shard"] == 7 and "node" in seen and "pid" in seen
    with pytest.raises(ShardTimeout, match=r"timeout: step synth ran past 0.5s"):
        with watch.step(7, "synth", rows=10):
            while True:
                time.sleep(0.05)
    # The deadline is disarmed once its step ends: nothing fires later.
    with watch.step(8, "read", rows=1):
        pass
    time.sleep(1)


def test_the_default_deadline_grows_with_the_rows_of_the_step():
    watch = Watch(None, {}, timeout_s=None, end_process=False)
    assert watch.seconds_for(100) == DEFAULT_BASE_S + 100 * DEFAULT_PER_ROW_S
    assert Watch(None, {}, timeout_s=5, end_process=False).seconds_for(100) == 5
