"""train_resnet.py: PLACEHOLDER until issue 4 lands."""
import sys

print("train_resnet.py is not written yet (issue 4); nothing was trained.", file=sys.stderr)
sys.exit(2)
