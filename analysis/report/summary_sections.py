"""summary.md sections on measurement noise, the frontier points and the IsoFLOP estimate of
the compute-optimal model size."""

from __future__ import annotations

import math
from functools import partial

import pandas as pd

from analysis.fit.isoflop import MIN_BUDGETS, MIN_SIZES
from analysis.fit.noise import seeds_per_point
from analysis.report.style import X_UNITS


def num(v, fmt: str = ".3g") -> str:
    """Format a number, with '–' for a missing or non-finite one."""
    try:
        if v is None or not math.isfinite(float(v)):
            return "–"
    except (TypeError, ValueError):
        return str(v)
    return format(float(v), fmt)


def _pct(v, fmt: str = ".2f") -> str:
    """A fraction as a percentage, '–' when missing."""
    return "–" if v is None or pd.isna(v) else format(100 * float(v), fmt)


def value_text(v, metric: str = "error") -> str:
    """A point's metric value for the tables: percent for an error, nats for --metric loss."""
    return num(v, ".4g") if metric == "loss" else _pct(v)


def value_header(metric: str = "error") -> str:
    """The tables' column name of a point's value."""
    return "loss (nats)" if metric == "loss" else "error (%)"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _seeds_text(points: pd.DataFrame) -> str:
    spp = seeds_per_point(points)
    if not spp["counts"]:
        return "no points"
    return ", ".join(f"{v} with {k} seed{'s' if k != '1' else ''}"
                     for k, v in spp["counts"].items())


def noise_section(frontier: pd.DataFrame, close: pd.DataFrame, x: str,
                  metric: str = "error") -> list[str]:
    """How sure each point is, and the frontier points another size ties with."""
    own = ("the t interval of its mean loss from the sd of its per-image losses (`loss_sd`; "
           "none for rows written without it)" if metric == "loss"
           else "the Wilson score interval of its error")
    out = ["## Measurement noise", "",
           ("Every eval point carries the images it was scored on (`num_samples`) and a 95% "
            f"interval: {own}, or, for runs repeated with "
            "other seeds (same recipe, averaged into one point), the t interval across seeds "
            "when that is wider (analysis/fit/noise.py)."), ""]
    n = pd.to_numeric(frontier.get("num_samples"), errors="coerce").dropna()
    imgs = ("unknown" if not len(n) else f"{int(n.min()):,}" if n.min() == n.max()
            else f"{int(n.min()):,}–{int(n.max()):,}")
    out.append(f"Frontier points: {_seeds_text(frontier)}; {imgs} images per eval.")
    if close.empty:
        return out + ["", ("No frontier point ties with another size: at every frontier "
                           "compute, the other sizes' intervals (within 5% compute) do not "
                           "overlap the winner's."), ""]
    v = partial(value_text, metric=metric)
    rows = [[num(r.compute), r.model, f"{v(r.error)} [{v(r.lo)}, {v(r.hi)}]",
             r.other, f"{v(r.other_error)} [{v(r.other_lo)}, {v(r.other_hi)}]"]
            for r in close.itertuples()]
    head = value_header(metric)[:-1] + " [95%])"
    return out + ["", (f"At these {len(close)} frontier computes another size differs from the "
                       "frontier size by less than their intervals (within 5% compute): which of "
                       "the two is compute-optimal there is not determined by these evals."), "",
                  *md_table([f"compute ({X_UNITS[x]})", "frontier size", head,
                           "other size", head], rows), ""]


def frontier_section(frontier: pd.DataFrame, col: str, x: str,
                     metric: str = "error") -> list[str]:
    """Every frontier point: compute, size, error (or loss) with interval, seeds and images."""
    draws = "probe_seeds" in frontier and frontier["probe_seeds"].notna().any()
    v = partial(value_text, metric=metric)
    rows = [[num(r[col]), r["model"], v(r["error"]),
             f"[{v(r['err_lo'])}, {v(r['err_hi'])}]", int(r["n_seeds"]),
             *([num(r["probe_seeds"], ".0f")] if draws else []),
             num(r.get("num_samples"), ",.0f")] for _, r in frontier.iterrows()]
    return ["## Frontier points", "",
            ("The compute-optimal (Pareto) points of the seed-averaged evals, which the law is "
             "fitted to:"), "",
            *md_table([f"compute ({X_UNITS[x]})", "model", value_header(metric),
                       "95% interval (" + ("nats)" if metric == "loss" else "%)"),
                     "seeds", *(["k-shot draws"] if draws else []), "images"], rows), ""]


def _profile_row(p: dict) -> list:
    if p["bound"] == "lower":
        value = f"≥ {num(p['params_opt'])} (bound: vertex beyond the largest size)"
    elif p["bound"] == "upper":
        value = f"≤ {num(p['params_opt'])} (bound: vertex below the smallest size)"
    else:
        value = num(p["params_opt"])
    iv = f"[{num(p['interval'][0])}, {num(p['interval'][1])}]" if p["interval"] else "–"
    seeds = "/".join(map(str, sorted(set(p["seeds"]))))
    return [num(p["compute"]), p["n_sizes"], seeds, value, iv, p["best_model"],
            ", ".join(p["tied"]) or "none"]


def isoflop_section(res: dict) -> list[str]:
    """Per budget N_opt (value or bound), the exponent a with its interval, or why not."""
    out = ["## Compute-optimal model size (IsoFLOP profiles)", "",
           ("Hoffmann et al. 2022, Sec. 3.2 (approach 2): per FLOPs budget (config `flops`; "
            "runs grouped by budget, not by their exact FLOPs) with final evals of at least "
            f"{MIN_SIZES} sizes, a parabola of log-error in log-params; its vertex is N_opt(C), "
            "a bound when it lies outside the sizes tried. Then N_opt ∝ C^a by least squares "
            f"over the budgets with a vertex inside (at least {MIN_BUDGETS} needed)."), ""]
    if res["profiles"]:
        rows = [_profile_row(p) for p in res["profiles"]]
        out += md_table(["budget (FLOPs)", "sizes", "seeds", "N_opt", "95% interval",
                       "best size tried", "sizes within its interval"], rows) + [""]
        out += [f"Budget {num(p['compute'])} FLOPs left out of the exponent fit: "
                f"{p['left_out']}." for p in res["profiles"] if p.get("left_out")]
        out += [""] if any(p.get("left_out") for p in res["profiles"]) else []
    fit = res["fit"]
    if fit is None:
        return out + [f"No exponent: {res['reason']}.", ""]
    a_lo, a_hi = fit["interval"]
    out.append(f"N_opt ∝ C^a with a = {fit['exponent']:.3f}, 95% interval [{a_lo:.3f}, "
               f"{a_hi:.3f}] (the wider of the bootstrap interval [{fit['interval_boot'][0]:.3f},"
               f" {fit['interval_boot'][1]:.3f}] and the t interval [{fit['interval_t'][0]:.3f}, "
               f"{fit['interval_t'][1]:.3f}]), over {fit['n']} budgets.")
    if not fit["monotone"]:
        out.append("N_opt does not grow with every budget step: read a with care.")
    return out + [""]


def bench_section(best: pd.DataFrame | None, order: list[str]) -> list[str]:
    """The benchmark rows behind throughput_mfu.png: per model and implementation, its numbers,
    the machine and settings, and the file it came from."""
    if best is None or best.empty:
        return []
    out = ["## Benchmark rows", "",
           ("The bars of `throughput_mfu.png`: per model, the newest configuration measured "
            "(machine, precision, batch, resolution, ...), each implementation's newest row in "
            "it. Files: `bench/*.jsonl` (committed reference rows) and `bench/local/*.jsonl` "
            "(this machine's, git-ignored)."), ""]
    rank = {m: i for i, m in enumerate(order)}
    best = best.assign(_r=best["model"].map(rank)).sort_values(["_r", "impl"], kind="stable")
    rows = [[r.get("model"), r.get("impl"), num(r.get("images_per_s")), _pct(r.get("mfu"), ".1f"),
             r.get("device", "–"), r.get("batch_size", "–"), r.get("image_size", "–"),
             r.get("precision", "–"), str(r.get("time", "–"))[:19], f"`{r.get('source')}`"]
            for _, r in best.iterrows()]
    return out + md_table(["model", "impl", "images/s", "MFU (%)", "device", "batch",
                         "image px", "precision", "time", "file"], rows) + [""]
