"""The world base's config (no host): its prediction and norm-group fields, and files saved before
them."""

import json

import pytest

from locref_core.world.models import WorldConfig


def test_a_base_predicts_epsilon_unless_told_and_round_trips_through_json():
    cfg = WorldConfig(latent_scale=0.5)
    assert cfg.prediction == "eps"
    assert WorldConfig.from_json(cfg.to_json()) == cfg
    assert WorldConfig.from_json(WorldConfig(prediction="v").to_json()).prediction == "v"


def test_a_base_saved_before_the_field_existed_loads_as_epsilon():
    old = json.loads(WorldConfig(prediction="v").to_json())
    del old["prediction"]
    assert WorldConfig.from_json(json.dumps(old)).prediction == "eps"


def test_an_unknown_prediction_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"'x0'.*\['eps', 'v'\]"):
        WorldConfig(prediction="x0")


def test_the_unet_norm_groups_default_to_the_hosts_32_and_must_divide_the_width():
    old = json.loads(WorldConfig().to_json())
    del old["unet_norm_groups"]  # a base saved before the field
    assert WorldConfig.from_json(json.dumps(old)).unet_norm_groups == 32
    assert WorldConfig.from_json(WorldConfig(unet_norm_groups=4).to_json()).unet_norm_groups == 4
    with pytest.raises(ValueError, match=r"unet_norm_groups 5 must divide unet_channels 32"):
        WorldConfig(unet_norm_groups=5)
