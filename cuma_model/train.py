"""`python -m cuma_model.train`: the survey training script, `cuma_model.survey.train`."""
import sys

from cuma_model.survey.train import main, train, train_seeds

__all__ = ["main", "train", "train_seeds"]

if __name__ == "__main__":
    sys.exit(main())
