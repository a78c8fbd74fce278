"""The paper configs' start-of-training block: protocol, class words and every SPEC decision."""

import json
import logging

from helpers.tiny import load_config
from ssvp_jax import decisions


def test_paper_configs_state_protocol_words_and_every_decision(caplog):
  for name in ("mvtec", "visa"):
    c = load_config(name)
    assert c.print_decisions and c.train_data.protocol == "bayes_pfl"
    s = decisions.summary(c)
    assert list(s["decisions"]) == [f"D{i}" for i in range(1, 23)]
  c = load_config("visa", **{"vtam.learn_tau": False})  # overrides show in the block
  with caplog.at_level(logging.INFO, logger="ssvp_jax"):
    decisions.announce(c)
  s = c.decisions.to_dict()
  assert s["eval_data"]["dagm"]["class_words"] == {f"Class{i}": f"fabric{i}" for i in (1, 2, 3, 4, 5, 7, 8)}
  assert s["eval_data"]["ksdd2"]["class_words"] == {"ksdd2": "metal"}
  assert s["eval_data"]["rsdd"] == {"name": "rsdd", "protocol": "bayes_pfl", "class_words": {"rail": "metal15"}}
  assert s["decisions"]["D7"] == "tau fixed 0.07" and "D11: L_seg form balanced" in caplog.text
  assert "eval btad: btad (bayes_pfl protocol): 01='metal1', 02='wood', 03='metal2'" in caplog.text
  assert json.loads(c.to_json_best_effort())["decisions"]["decisions"]["D22"].startswith("EXIF")
  assert not load_config("demo").print_decisions
