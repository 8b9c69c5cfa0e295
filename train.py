"""Train one MLP (or a sweep of them) from the Hydra configs in ``conf/``.

    python train.py                                   # moons, 16x16 tanh, Adam
    python train.py dataset=spirals optimizer=sgd optimizer.lr=0.5
    python train.py +experiment=xor_2_2_1
    python train.py -m model.hidden_sizes='[4],[8],[16]' optimizer.lr=0.01,0.1
    python train.py +sweep=width_x_lr

Hydra composes the config; :mod:`pipeline.app.cli` checks it and runs the job. A bad
config prints one line ``config error: <key>=<value>: <what is allowed>`` and exits 2; a
run that fails prints one line and exits 1; Ctrl-C and SIGTERM end the run KILLED and
exit 130 and 143. ``HYDRA_FULL_ERROR=1`` shows the full traceback.
"""

from pipeline.app import process

if __name__ == "__main__":
    process.start()  # before the imports: see pipeline/app/process.py

import hydra  # noqa: E402

from pipeline.app import cli  # noqa: E402
from pipeline.app.config import register_configs  # noqa: E402

# The schemas must be in the ConfigStore before Hydra composes conf/config.yaml; at module
# level, so that launchers running jobs in other processes get them too.
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):  # noqa: ANN001, ANN201
    """Hydra's entry point: one composed config in, the job's objective out."""
    return cli.job(cfg)


if __name__ == "__main__":
    process.exit(cli.run(main), cli.single_run())
