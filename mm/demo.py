"""`make demo`: the main job on the embedded tiny default (CPU, no downloads).

Until the demo lands (it needs the training and inference entry points) this prints the plan and exits
without pretending to train anything.
"""

PLAN = """\
make demo will, on this CPU, with nothing downloaded:
  1. generate a synthetic dataset of coloured shapes moving in H.264 clips (python -m mm.data.synthetic)
  2. fit the tiny WFVAE on it (reconstruction + KL)
  3. train a tiny SUV with 2 processes (TP=2 + sequence parallel on gloo) via pretrain_sora.py
  4. run batch inference on a handful of prompts via inference_sora.py
  5. write mp4s, a loss curve and a summary under outputs/demo/
Status: not available yet -- the training and inference entry points have not landed.
Today you can run the test suite: make test
"""


def main() -> int:
    print(PLAN, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
