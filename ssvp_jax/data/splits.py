"""A configured dataset section (`config.train_data`, `config.eval_data.<key>`) -> its records.

`read_split` resolves the `{workdir}` template in the root, writes the demo data first when the
section asks for it (`prepare_demo_data`, one writer across processes), and reads the records
through `ssvp_jax.data.datasets.read_dataset`. It lives beside, not in, `datasets.py`: the readers
stay free of the config, the process group and the demo generator (and `ssvp_jax.validate`,
which checks the roots through `datasets`, would otherwise import in a circle).
"""

from __future__ import annotations

import ml_collections

from ssvp_jax import distributed, validate
from ssvp_jax.data import datasets, synth


def prepare_demo_data(ds: ml_collections.ConfigDict, root: str) -> None:
  """Makes `root` a complete demo dataset as `ds.synth` describes (ssvp_jax.data.synth.ensure)."""
  s = ds.synth
  synth.ensure(s.layout, root, s.categories, size=s.size, num_good=s.num_good, num_anomalous=s.num_anomalous,
               seed=s.seed)


def read_split(ds: ml_collections.ConfigDict, workdir: str, section: str):
  """Records of a configured dataset; `section` names the config field in error messages."""
  if not ds.root:
    title = datasets.DATASETS[ds.name].title if ds.name in datasets.DATASETS else ds.name
    raise ValueError(f"config.{section}.root is empty: pass --config.{section}.root=DIR (the extracted "
                     f"{title} folder)")
  root = ds.root.replace("{workdir}", workdir)
  if validate.generated_root(ds):  # only into roots the config templates under the work directory
    if distributed.is_main():  # one writer; the other processes wait for its files
      prepare_demo_data(ds, root)
    distributed.barrier("demo data")
  return datasets.read_dataset(ds.name, root, ds.split, tuple(ds.categories) or None,
                               protocol=ds.get("protocol", "full"))
