"""`python -m cuma_model.export`: the survey export command line, `cuma_model.survey.export` (the static LoRA
math is `cuma_model.static_lora`)."""
import sys

from cuma_model.survey.export import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
