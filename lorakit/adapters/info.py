"""What `lorakit lora info` reports: family, algorithm, rank/alpha per block, blocks present, training metadata,
per-block weight norms (as sd-scripts' check_lora_weights looks at them) and NaN / all-zero modules. No model needed."""

from __future__ import annotations

import json
from collections import Counter, OrderedDict

import torch

from lorakit.adapters.blocks import lbw_block_of
from lorakit.adapters.embeddings import bundle_words, split_bundle
from lorakit.adapters.file import best_family, detect_family, read_lora_file, to_kohya
from lorakit.adapters.network import group_by_module
from lorakit.models.families import FAMILIES

BLOCK_ORDER = (["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
               + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OTHER"])  # D/S: FLUX


def _algo_of(w: dict) -> str:
    if "lora_down.weight" in w:
        return "lora"
    if "hada_w1_a" in w:
        return "loha"
    if "lokr_w1" in w or "lokr_w1_a" in w:
        return "lokr"
    if "diff" in w:
        return "full"
    if "w_norm" in w:
        return "norm"
    if "oft_blocks" in w or "oft_diag" in w:
        return "oft"
    if "on_input" in w:
        return "ia3"
    return "unknown"


def _rank(w: dict, algo: str) -> int | None:
    if algo == "lora":
        return int(w["lora_down.weight"].shape[0])
    if algo == "loha":
        return int(w["hada_w1_b"].shape[0])
    if algo == "lokr":
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in w:
                return int(w[k].shape[0])
    return None


def _delta_norm(w: dict, algo: str, rank: int | None, alpha: float | None) -> float | None:
    """Frobenius norm of the module's weight change at multiplier 1 (float32)."""
    f = {k: v.float() for k, v in w.items() if v.is_floating_point()}
    scale = (alpha / rank) if (rank and alpha is not None) else 1.0
    if algo == "lora":
        up, down = f["lora_up.weight"].flatten(1), f["lora_down.weight"].flatten(1)
        if "lora_mid.weight" in f:
            d = torch.einsum("ijkl,oi,jn->onkl", f["lora_mid.weight"], up, down)
        else:
            d = up @ down
        return float(d.norm() * scale)
    if algo == "loha":
        if "hada_t1" in f:
            w1 = torch.einsum("ijkl,ip,jq->pqkl", f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            w2 = torch.einsum("ijkl,ip,jq->pqkl", f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:
            w1, w2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        return float((w1 * w2).norm() * scale)
    if algo == "lokr":
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = torch.einsum("ijkl,ip,jq->pqkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if not (rank and alpha is not None):
            scale = 1.0
        return float(w1.norm() * w2.norm() * scale)  # ||kron(A, B)|| = ||A|| ||B||
    if algo in ("full", "norm"):
        return float(f.get("diff", f.get("w_norm")).norm())
    return None


def _shape_problem(w: dict, algo: str) -> str | None:
    """Why a LoRA module's factors cannot form a weight change (a damaged or hand-edited file), or None."""
    if algo != "lora" or "lora_up.weight" not in w:
        return None
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    if up.dim() < 2 or down.dim() < 2:
        return f"lora_up/lora_down are not matrices (shapes {tuple(up.shape)} and {tuple(down.shape)})"
    if up.shape[1] != down.shape[0]:
        return (f"up/down ranks differ: lora_up has rank {up.shape[1]}, lora_down rank {down.shape[0]} "
                "(the file is damaged or was edited; it cannot be applied)")
    return None


def summarize(path, top_tags: int = 20) -> dict:
    lf = read_lora_file(path, finite=False)  # NaN/inf modules are reported below, not refused
    sd, bundled = split_bundle(to_kohya(lf.tensors, lf.metadata, None, source=str(lf.path)))
    md = lf.metadata
    cands, why = detect_family(sd, md)
    fam = best_family(cands)
    modules = group_by_module(sd)
    blocks: dict[str, dict] = {}
    algos = Counter()
    flagged = []
    conv3 = False
    dora = False
    for name in sorted(modules):
        w = modules[name]
        algo = _algo_of(w)
        algos[algo] += 1
        rank = _rank(w, algo)
        alpha = float(w["alpha"].float()) if "alpha" in w else None
        if algo == "lora" and w["lora_down.weight"].dim() == 4 and w["lora_down.weight"].shape[-1] > 1:
            conv3 = True
        dora = dora or "dora_scale" in w
        finite = all(bool(torch.isfinite(v.float()).all()) for v in w.values() if v.is_floating_point())
        broken = _shape_problem(w, algo)
        norm = None
        if finite and broken is None:
            try:
                norm = _delta_norm(w, algo, rank, alpha)
            except (RuntimeError, KeyError, ValueError) as exc:  # shapes that do not multiply: a damaged file
                broken = f"tensors do not fit together ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        block = lbw_block_of(name)
        b = blocks.setdefault(block, {"modules": 0, "ranks": Counter(), "alphas": Counter(), "norm_sum": 0.0,
                                      "norm_max": 0.0, "abs_up": [], "abs_down": []})
        b["modules"] += 1
        if rank is not None:
            b["ranks"][rank] += 1
        if alpha is not None:
            b["alphas"][alpha] += 1
        if norm is not None:
            b["norm_sum"] += norm
            b["norm_max"] = max(b["norm_max"], norm)
        if "lora_up.weight" in w:
            b["abs_up"].append(float(w["lora_up.weight"].float().abs().mean()))
            b["abs_down"].append(float(w["lora_down.weight"].float().abs().mean()))
        if broken is not None:
            flagged.append({"module": name, "problem": broken})
        elif not finite:
            flagged.append({"module": name, "problem": "NaN/Inf"})
        elif norm is not None and norm == 0.0:
            flagged.append({"module": name, "problem": "all zero (untrained?)"})
    block_rows = OrderedDict()
    for blk in sorted(blocks, key=lambda x: BLOCK_ORDER.index(x) if x in BLOCK_ORDER else 99):
        b = blocks[blk]
        block_rows[blk] = {
            "modules": b["modules"],
            "rank": _counter_str(b["ranks"]),
            "alpha": _counter_str(b["alphas"]),
            "mean_delta_norm": b["norm_sum"] / b["modules"] if b["modules"] else 0.0,
            "max_delta_norm": b["norm_max"],
            "mean_abs_up": sum(b["abs_up"]) / len(b["abs_up"]) if b["abs_up"] else None,
            "mean_abs_down": sum(b["abs_down"]) / len(b["abs_down"]) if b["abs_down"] else None,
        }
    return {
        "file": str(lf.path),
        "file_size": lf.size,
        "family": fam,
        "family_title": FAMILIES[fam].short_title if fam else "unknown",
        "family_candidates": sorted(cands),
        "family_reason": why,
        "algorithm": _algorithm_label(algos, conv3, dora, md),
        "modules": len(modules),
        "tensors": len(lf.tensors),
        "dtype": sorted({str(v.dtype).replace("torch.", "") for v in lf.tensors.values() if v.is_floating_point()}),
        "blocks_present": [b for b in block_rows if b != "OTHER"],
        "blocks": block_rows,
        "flagged": flagged,
        # word -> {encoder key: [tokens, width]}: the bundled token embeddings (--train_embedding)
        "embeddings": {w: {k: list(v.shape) for k, v in parts.items()} for w, parts in bundle_words(bundled).items()},
        "training": _training_summary(md, top_tags),
    }


def _counter_str(c: Counter):
    if not c:
        return None
    if len(c) == 1:
        v = next(iter(c))
        return int(v) if float(v).is_integer() else v
    return {str(k): n for k, n in sorted(c.items())}


def _algorithm_label(algos: Counter, conv3: bool, dora: bool, md: dict) -> str:
    names = [a for a, _ in algos.most_common()]
    module = md.get("ss_network_module", "")
    label = "+".join(names)
    if names == ["lora"]:
        label = "LoCon (LoRA with conv layers)" if conv3 else "LoRA"
        if module == "networks.dylora":
            label = "DyLoRA" + (" (with conv layers)" if conv3 else "")
    else:
        label = {"loha": "LoHa", "lokr": "LoKr", "full": "full (diff)", "oft": "OFT", "ia3": "IA3"}.get(label, label)
    if dora:
        label = "DoRA (" + label + ")"
    if module:
        label += f" [{module}]"
    return label


def _json(md: dict, key: str):
    try:
        return json.loads(md[key]) if key in md else None
    except ValueError:
        return None


def _training_summary(md: dict, top_tags: int) -> dict:
    out: dict = {}
    keys = {"ss_sd_model_name": "base_model", "ss_steps": "steps", "ss_epoch": "epoch", "ss_num_epochs": "epochs",
            "ss_optimizer": "optimizer", "ss_learning_rate": "learning_rate", "ss_unet_lr": "unet_lr",
            "ss_text_encoder_lr": "text_encoder_lr", "ss_lr_scheduler": "lr_scheduler", "ss_network_dim": "network_dim",
            "ss_network_alpha": "network_alpha", "ss_network_module": "network_module", "ss_resolution": "resolution",
            "ss_clip_skip": "clip_skip", "ss_mixed_precision": "mixed_precision", "ss_seed": "seed",
            "ss_num_train_images": "train_images", "ss_num_reg_images": "reg_images", "ss_output_name": "output_name",
            "ss_sd_model_hash": "base_model_hash", "ss_new_sd_model_hash": "base_model_sha256",
            "modelspec.title": "title", "modelspec.trigger_phrase": "trigger_phrase",
            # sshs_model_hash is this LoRA file's own hash (A1111's "Lora hashes"), not the base model's
            "sshs_model_hash": "lora_hash"}
    for k, name in keys.items():
        if md.get(k) not in (None, "", "None"):
            out[name] = md[k]
    args = _json(md, "ss_network_args")
    if args:
        out["network_args"] = args
    for k in ("ss_training_started_at", "ss_training_finished_at"):
        try:
            import datetime

            out[k[3:]] = datetime.datetime.fromtimestamp(float(md[k])).isoformat(timespec="seconds")
        except (KeyError, ValueError, OverflowError):
            pass
    dirs = _json(md, "ss_dataset_dirs")
    if isinstance(dirs, dict):
        out["dataset_dirs"] = {d: {"repeats": v.get("n_repeats"), "images": v.get("img_count")}
                               for d, v in dirs.items() if isinstance(v, dict)}
    freq = _json(md, "ss_tag_frequency")
    if isinstance(freq, dict):
        total = Counter()
        for tags in freq.values():
            if isinstance(tags, dict):
                for t, n in tags.items():
                    try:
                        total[t.strip()] += int(n)
                    except (TypeError, ValueError):
                        pass
        out["top_tags"] = total.most_common(top_tags)
    return out


def format_text(info: dict) -> str:
    lines = [f"file:      {info['file']} ({_size(info['file_size'])})",
             f"family:    {info['family_title']}" + (f"  [{info['family_reason']}]" if info["family_reason"] else ""),
             f"algorithm: {info['algorithm']}",
             f"modules:   {info['modules']} ({info['tensors']} tensors, {', '.join(info['dtype'])})",
             f"blocks:    {', '.join(info['blocks_present']) or '-'}"]
    if info.get("embeddings"):
        lines.append("embedded:  " + ", ".join(
            f"{w} ({', '.join(f'{k} {shape[0]}x{shape[1]}' for k, shape in parts.items())})"
            for w, parts in info["embeddings"].items()) + "  (bundled token embeddings: write the word in the prompt)")
    lines += ["",
             f"{'block':<6} {'modules':>7} {'rank':>8} {'alpha':>8} {'mean |dW|':>11} {'max |dW|':>10} "
             f"{'mean|up|':>10} {'mean|down|':>10}"]
    for name, b in info["blocks"].items():
        lines.append(f"{name:<6} {b['modules']:>7} {_cell(b['rank']):>8} {_cell(b['alpha']):>8} "
                     f"{b['mean_delta_norm']:>11.4g} {b['max_delta_norm']:>10.4g} {_cell(b['mean_abs_up'], 4):>10} "
                     f"{_cell(b['mean_abs_down'], 4):>10}")
    if info["flagged"]:
        lines += ["", f"WARNING: {len(info['flagged'])} module(s) look broken:"]
        lines += [f"  {f['module']}: {f['problem']}" for f in info["flagged"][:20]]
        if len(info["flagged"]) > 20:
            lines.append(f"  ... and {len(info['flagged']) - 20} more")
    t = info["training"]
    if t:
        lines += ["", "training:"]
        for k, v in t.items():
            if k in ("dataset_dirs", "top_tags", "network_args"):
                continue
            lines.append(f"  {k}: {v}")
        if "network_args" in t:
            lines.append("  network_args: " + " ".join(f"{k}={v}" for k, v in t["network_args"].items()))
        if "dataset_dirs" in t:
            lines.append("  dataset dirs:")
            lines += [f"    {d}: {v['images']} images x {v['repeats']} repeats" for d, v in t["dataset_dirs"].items()]
        if t.get("top_tags"):
            lines.append("  top tags: " + ", ".join(f"{tag} ({n})" for tag, n in t["top_tags"]))
    return "\n".join(lines)


def _cell(v, digits=None):
    if v is None:
        return "-"
    if isinstance(v, dict):  # several values in one block (e.g. linear rank / conv rank)
        return "/".join(k[:-2] if k.endswith(".0") else k for k in v)
    if digits and isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)

