"""The environment `ensure_ray` gives the driver, as Ray Train reads it."""

from bootfinetune.runtime.ray_env import DRIVER_ENV, set_driver_env

POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def test_ray_trains_controller_gets_the_shorter_poll_and_a_users_own_value_is_kept(monkeypatch):
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR, get_env_vars_to_propagate

    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR == POLL  # the name Ray Train reads
    monkeypatch.delenv(POLL, raising=False)
    set_driver_env()
    assert get_env_vars_to_propagate()[POLL] == DRIVER_ENV[POLL] == "0.5"  # carried to the controller

    monkeypatch.setenv(POLL, "3")
    set_driver_env()
    assert get_env_vars_to_propagate()[POLL] == "3"
