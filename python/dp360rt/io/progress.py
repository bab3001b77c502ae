"""The command line's progress display: one tqdm bar per pipeline stage."""
from __future__ import annotations


def progress_bar():
    """A ``progress(stage, i, n)`` callback (the pipeline's) that draws one tqdm bar per stage."""
    from tqdm import tqdm
    bars: dict[str, tqdm] = {}

    def update(stage: str, i: int, n: int) -> None:
        bar = bars.get(stage)
        if bar is None or bar.n >= bar.total:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=n, desc=stage, unit="step", leave=False)
        bar.update(1)

    return update
