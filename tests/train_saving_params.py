"""tdpo-train that also saves each process's final parameters: runs
tdpo_ext.training.train.main, and when a stage ends, every rank writes its model's
parameters to FOLDER/STAGE.rank{R}.pt (rank 0's final/ alone cannot show that the ranks
agree).

    python tests/train_saving_params.py FOLDER TDPO-TRAIN-ARGS...
"""
import os
import sys

import torch

from tdpo_ext.training import hooks, train


def main():
    folder, argv = sys.argv[1], sys.argv[2:]
    os.makedirs(folder, exist_ok=True)

    def save_params(event, where):
        if event == "stage_done":
            stage = where["stage"]
            torch.save(stage.module.state_dict(),
                       os.path.join(folder, f"{stage.name}.rank{stage.procs.rank}.pt"))

    with hooks.listening(save_params):
        sys.exit(train.main(argv))


if __name__ == "__main__":
    main()
