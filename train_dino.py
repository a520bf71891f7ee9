"""train_dino.py: PLACEHOLDER until issue 5 lands."""
import sys

print("train_dino.py is not written yet (issue 5); nothing was trained.", file=sys.stderr)
sys.exit(2)
