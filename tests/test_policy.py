"""The scheduling policies alone (axfs.policy): who is served first, and the accounts."""

from __future__ import annotations

import pytest

from axfs.config import TaskConfig
from axfs.policy import FairPolicy, FifoPolicy, make_policy
from axfs.task import Task


def task(task_id: str, uid: int, submitted_at: float, priority: int = 100) -> Task:
    t = Task(task_id, uid, uid, TaskConfig(priority=priority))
    t.submitted_at = submitted_at
    return t


def test_fifo_serves_in_submission_order_whoever_submitted() -> None:
    a, b, c = task("a", 1, 3.0), task("b", 2, 1.0), task("c", 1, 2.0)
    policy = FifoPolicy()
    assert policy.order([a, b, c]) == [b, c, a]
    policy.charge(a, 5)
    assert policy.order([a, b, c]) == [b, c, a]  # what ran does not change the order


def test_fair_alternates_users_however_many_tasks_each_has() -> None:
    many = [task(f"m{i}", 1, float(i)) for i in range(4)]
    one = task("o", 2, 10.0)
    order = FairPolicy().order([*many, one])
    assert order[:2] in ([many[0], one], [one, many[0]])  # the second user is not last


def test_fair_charges_move_a_user_behind_the_other() -> None:
    a, b = task("a", 1, 1.0), task("b", 2, 2.0)
    policy = FairPolicy()
    assert policy.order([a, b])[0] is a
    policy.charge(a, 100)
    assert policy.order([a, b])[0] is b
    assert policy.users()[1] == (100.0, 100) and policy.users()[2] == (100.0, 0)


def test_fair_priority_weighs_tasks_within_a_user() -> None:
    low, high = task("low", 1, 1.0, priority=100), task("high", 1, 2.0, priority=1000)
    policy = FairPolicy()
    policy.order([low, high])
    policy.charge(low, 10)
    policy.charge(high, 10)  # ten tokens are a tenth as much of high's share
    assert policy.order([low, high])[0] is high


def test_a_newcomer_starts_at_the_others_level_not_at_zero() -> None:
    old = task("old", 1, 1.0)
    policy = FairPolicy()
    policy.order([old])
    policy.charge(old, 1000)
    new = task("new", 2, 2.0)
    policy.order([old, new])  # it enters at the level of those running
    policy.charge(old, 1)
    assert policy.order([old, new])[0] is new
    policy.charge(new, 2)  # from zero it would come first for the next 1000 tokens
    assert policy.order([old, new])[0] is old


def test_a_waiting_task_given_a_higher_priority_goes_before_its_users_others() -> None:
    policy = FairPolicy()
    running = task("r", 1, 1.0)
    policy.order([running])
    policy.charge(running, 50)
    early = task("e", 1, 2.0)
    policy.order([running, early])  # placed where r was then
    policy.charge(running, 50)
    late = task("l", 1, 3.0)
    policy.order([running, late])  # placed where r is now, after early's place
    policy.charge(running, 50)
    assert policy.order([running, early, late]) == [early, late, running]
    late.config.priority = 1000  # `ctl priority 1000` while it waits
    assert policy.order([running, early, late]) == [late, early, running]
    policy.charge(early, 1)  # once it has run, a task is ranked by what it ran
    assert policy.order([running, early, late]) == [early, late, running]


def test_make_policy_names() -> None:
    assert make_policy("fair").name == "fair" and make_policy("fifo").name == "fifo"
    with pytest.raises(ValueError, match="no scheduling policy"):
        make_policy("lottery")
