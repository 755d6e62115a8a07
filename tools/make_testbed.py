"""Build memedit's embedded test model from nothing: a tiny Stable Diffusion that memorizes.

Deterministic (fixed seeds, data generated in code by ``memedit.testbed.scenes``, one thread,
deterministic torch algorithms), CPU only, about 30 minutes on this project's 2-core machine.
Steps:

1. data: ordinary scenes (training combinations only) and 20 memorized images, each duplicated
   so that the duplicates are a minority (default 20%) of the training set; most ordinary
   captions (``--title-share``, default 80%) end in a fresh alt-text title that names nothing
   in the picture, as LAION's do, so that only a memorized caption's title repeats;
2. tokenizer: the real CLIP BPE (``bpe_simple_vocab_16e6.txt.gz`` from the open_clip_torch
   wheel, fetched with ``pip download --no-deps``), cut to the merges the corpus uses, saved as
   a standard ``CLIPTokenizer`` (vocab.json + merges.txt);
3. VAE: a tiny ``AutoencoderKL`` (32x32x3 <-> 16x16x4) trained on reconstructions, with the
   memorized images duplicated in its data too, so that it reconstructs them far below the
   copy threshold (otherwise no generation could count as a copy);
4. text encoder: a tiny ``CLIPTextModel``, pretrained on the ordinary pairs alone (as SD's CLIP
   was trained on images and captions of its own), then FROZEN (as SD's CLIP is: what the
   duplicates teach has to live in the UNet, where the method looks for it);
5. UNet: ``UNet2DConditionModel`` with cross-attention transformer blocks (2 per block), trained
   as SD is (epsilon prediction, scaled_linear betas, 10% caption dropout, EMA), in two stages:
   ordinary data alone first (a generalist), then the mix with the duplicated pairs;
6. save: ``StableDiffusionPipeline.save_pretrained`` (safetensors, DDIM scheduler), the prompt
   sets, the memorized training images and ``training_log.csv``.

Usage::

    python tools/make_testbed.py                 # full build into memedit/testbed/
    python tools/make_testbed.py --quick --out /tmp/tb   # a few-minute smoke run
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: on a shared 2-core machine two threads each step ran 8x slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memedit.testbed import scenes  # noqa: E402

PACKAGE_DIR = REPO / "memedit" / "testbed"
OPEN_CLIP = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 32  # tokens; every caption here is shorter than 20
N_LOCATE = 10  # memorized captions 0-9 locate, 10-19 are held out


# ----------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def fetch_bpe(bpe_path: str | None) -> bytes:
    """The gzipped CLIP merges file: from ``bpe_path`` (a .gz or a wheel) or via pip download."""
    if bpe_path and bpe_path.endswith(".gz"):
        return Path(bpe_path).read_bytes()
    if bpe_path:
        wheel = Path(bpe_path)
    else:
        tmp = tempfile.mkdtemp(prefix="open_clip_")
        # --no-deps: only the wheel; installing open_clip_torch would pull another torch.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", OPEN_CLIP,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(BPE_MEMBER)


def reduced_clip_bpe(bpe_gz: bytes, words: set[str]) -> tuple[dict[str, int], list[str]]:
    """Vocab and merges of the CLIP BPE restricted to what ``words`` need.

    Runs CLIP's BPE on every word, records each merge that fires, and keeps those merges in
    their original rank order (plus the 512 byte tokens and the two special tokens). The
    reduced tokenizer therefore splits every corpus word exactly as the full one does.
    """
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    ranks = {m: i for i, m in enumerate(merges)}
    byte_encoder = bytes_to_unicode()
    used: set[tuple[str, str]] = set()
    for word in sorted(words):
        token = "".join(byte_encoder[b] for b in word.encode("utf-8"))
        parts = [*token[:-1], token[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, math.inf))
            if best not in ranks:
                break
            used.add(best)
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    kept = sorted(used, key=ranks.__getitem__)
    base = list(byte_encoder.values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in kept]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, [" ".join(m) for m in kept]


def build_tokenizer(bpe_gz: bytes, texts: list[str], folder: Path):
    """Write and load the reduced CLIPTokenizer; assert it kept its vocabulary."""
    from transformers import CLIPTokenizer

    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    vocab, merges = reduced_clip_bpe(bpe_gz, words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=MAX_LENGTH)
    assert len(tok) == len(vocab), f"tokenizer has {len(tok)} tokens, expected {len(vocab)}"
    return tok


# ----------------------------------------------------------------------------- models


def build_text_encoder(tokenizer, seed: int):
    """A tiny CLIP text encoder, randomly initialised and frozen (see pretrain_text_encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return model.eval().requires_grad_(False)


class TextToLatent(torch.nn.Module):
    """The text encoder's pretraining head: the latent a caption describes, read from its token
    states by one cross-attention layer whose queries are an 8x8 grid of learned positions.

    A query can only find the colour and shape at its position if the encoder has put them in
    the tokens together, so the encoder learns to bind "red" to "left" in "a red circle on the
    left and ...": the composition a random frozen encoder lacks (and CLIP has).
    """

    def __init__(self, width: int, latent_channels: int = 4, grid: int = 8) -> None:
        super().__init__()
        self.grid, self.channels = grid, latent_channels
        self.queries = torch.nn.Parameter(torch.randn(grid * grid, width) * 0.02)
        self.attention = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.norm = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))
        self.out = torch.nn.Linear(width, latent_channels * 4)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Token states [B, T, width] -> latents [B, C, 2 * grid, 2 * grid]."""
        b, g, c = len(states), self.grid, self.channels
        q = self.queries.expand(b, -1, -1)
        h = q + self.attention(q, states, states, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        # Each query writes its 2x2 patch of the latent (a pixel shuffle).
        return self.out(h).view(b, g, g, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            b, c, 2 * g, 2 * g)


def build_vae(seed: int):
    """AutoencoderKL with one downsampling: 32x32x3 <-> 16x16x4 (about 0.2 M parameters)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=scenes.SIZE,
        mid_block_add_attention=False,
    )


def build_unet(seed: int):
    """UNet2DConditionModel with SD's block kinds at a tiny scale.

    Cross-attention transformer blocks at 8x8 and 4x4 (two BasicTransformerBlocks per
    attention, so the FFNs the method prunes hold a larger share of the weights than in a one
    -layer design); latent 16x16 so the pipeline's default size is the native 32x32. Unlike SD,
    the top resolution has no attention: with SD's order (attention at 16x16 and 8x8, one layer
    per block) a step took 0.58 s instead of 0.40 s, and 3,600 steps neither memorized nor
    generalized (see the model card).
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=scenes.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, attention_head_dim=4, cross_attention_dim=64,
        norm_num_groups=8,
    )


def sd_scheduler_config() -> dict:
    """Stable Diffusion's noise schedule (scaled_linear betas 0.00085-0.012, 1000 steps)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "prediction_type": "epsilon"}


# ----------------------------------------------------------------------------- data


def quantize(images: np.ndarray) -> np.ndarray:
    """Round to 8 bits, so that the PNGs shipped are exactly the images trained on."""
    return (np.round(np.clip(images, 0, 1) * 255) / 255).astype(np.float32)


def make_data(n_ordinary: int, copies: int, seed: int, title_share: float):
    """Training captions and images: ordinary scenes plus ``copies`` of each memorized pair."""
    pairs = list(scenes.ordinary_dataset(n_ordinary, seed=seed, title_share=title_share))
    captions = [c for c, _ in pairs]
    images = [scenes.render(s) for _, s in pairs]
    mem = quantize(scenes.memorized_images())
    is_mem = np.zeros(len(pairs) + copies * len(mem), dtype=bool)
    is_mem[len(pairs):] = True
    for _ in range(copies):
        captions += list(scenes.MEMORIZED_CAPTIONS)
        images += list(mem)
    return captions, np.stack(images), is_mem, pairs


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] in [0, 1] -> [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids as the pipeline makes them (padded to max_length)."""
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """The frozen text encoder's last hidden states, what the pipeline conditions on."""
    return torch.cat([text_encoder(ids[i : i + 512])[0] for i in range(0, len(ids), 512)])


# ----------------------------------------------------------------------------- training


class Logger:
    """Appends one CSV row per logged step (stage, step, loss, lr, seconds)."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["stage", "step", "loss", "lr", "seconds"])
        self.start = time.time()

    def log(self, stage: str, step: int, loss: float, lr: float) -> None:
        self.writer.writerow([stage, step, f"{loss:.6f}", f"{lr:.3g}",
                              f"{time.time() - self.start:.1f}"])
        self.file.flush()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(name: str, params: list[torch.nn.Parameter], batch_loss: Callable[[], torch.Tensor],
        steps: int, peak_lr: float, warmup: int, weight_decay: float, logger: Logger) -> None:
    """AdamW on ``batch_loss()`` (a fresh batch each call) under :func:`lr_at`'s schedule,
    with a progress bar and a log row every 10 steps, both named ``name``."""
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=weight_decay)
    bar = tqdm(range(steps), desc=name, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            logger.log(name, step, loss.item(), opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{loss.item():.4f}")


def train_vae(vae, images: np.ndarray, steps: int, seed: int, logger: Logger) -> float:
    """Reconstruction training (L1 + L2, tiny KL); returns SD's latent scaling factor."""
    gen = torch.Generator().manual_seed(seed)
    data = to_tensor(images)

    def batch_loss() -> torch.Tensor:
        x = data[torch.randint(len(data), (32,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * posterior.kl().mean()

    vae.train()
    fit("vae", list(vae.parameters()), batch_loss, steps, 2e-3, 50, 0.0, logger)
    vae.eval()
    return float(1.0 / encode_latents(vae, data).std())


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Latent means of ``x`` ([N, 3, H, W] in [-1, 1]), unscaled, 256 images at a time."""
    return torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean
                      for i in range(0, len(x), 256)])


@torch.no_grad()
def reconstruction_mse(vae, images: np.ndarray) -> np.ndarray:
    """Per-image pixel MSE (in [0, 1]) of an encode-decode round trip through the latent mean."""
    x = to_tensor(images)
    rec = vae.decode(encode_latents(vae, x)).sample
    return ((rec.clamp(-1, 1) - x) / 2).pow(2).mean((1, 2, 3)).numpy()


def pretrain_text_encoder(text_encoder, ids: torch.Tensor, latents: torch.Tensor, steps: int,
                          seed: int, logger: Logger) -> None:
    """Train ``text_encoder`` with a :class:`TextToLatent` head to predict each caption's latent
    (ordinary pairs only), then freeze it. The head is thrown away; only the encoder ships."""
    torch.manual_seed(seed)
    head = TextToLatent(text_encoder.config.hidden_size, latents.shape[1])
    gen = torch.Generator().manual_seed(seed + 2)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(ids), (64,), generator=gen)
        return (head(text_encoder(ids[idx])[0]) - latents[idx]).pow(2).mean()

    text_encoder.requires_grad_(True)
    fit("text", [*text_encoder.parameters(), *head.parameters()], batch_loss, steps, 1e-3, 100,
        0.01, logger)
    text_encoder.eval().requires_grad_(False)


def train_unet(unet, latents: torch.Tensor, embeds: torch.Tensor, empty: torch.Tensor,
               is_mem: np.ndarray, args, logger: Logger):
    """SD-style epsilon training in two stages; returns the EMA weights' UNet."""
    import copy

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items()
                             if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 1)
    ordinary_idx = torch.from_numpy(np.nonzero(~is_mem)[0])
    all_idx = torch.arange(len(latents))
    stage1 = int(args.steps * args.stage1_frac)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    bar = tqdm(range(args.steps), desc="unet", unit="step")
    for step in bar:
        stage = "unet-ordinary" if step < stage1 else "unet-mix"
        pool = ordinary_idx if step < stage1 else all_idx
        lr = lr_at(step, args.steps, args.lr, 100)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = pool[torch.randint(len(pool), (args.batch,), generator=gen)]
        x0 = latents[idx]
        cond = embeds[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < 0.1  # SD's 10% caption dropout
        cond[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (unet(xt, t, cond).sample - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if step % 10 == 0 or step == args.steps - 1:
            logger.log(stage, step, loss.item(), lr)
            bar.set_postfix(loss=f"{loss.item():.4f}", stage=stage[5:])
    return ema.eval()


# ----------------------------------------------------------------------------- outputs


def write_prompt_files(out: Path, pairs: list[tuple[str, dict]], seed: int) -> None:
    """Prompt sets (JSONL) and the memorized training images (PNG) under ``out``."""
    prompts, images = out / "prompts", out / "images"
    prompts.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    mem = quantize(scenes.memorized_images())
    rows = []
    for i, (cap, img) in enumerate(zip(scenes.MEMORIZED_CAPTIONS, mem, strict=True)):
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(images / f"mem_{i:02d}.png")
        rows.append({"prompt": cap, "image": f"../images/mem_{i:02d}.png"})

    def dump(name: str, items: list[dict]) -> None:
        with (prompts / f"{name}.jsonl").open("w") as f:
            for row in items:
                f.write(json.dumps(row) + "\n")

    dump("memorized_locate", rows[:N_LOCATE])
    dump("memorized_heldout", rows[N_LOCATE:])
    # Seen: the first training scenes, one per distinct combination, exactly as trained on.
    seen, combos = [], set()
    for cap, scene in pairs:
        key = tuple((o["shape"], o["color"], o["position"]) for o in scene["objects"])
        if key not in combos:
            combos.add(key)
            seen.append({"prompt": cap, "scene": scene})
        if len(seen) == 64:
            break
    dump("ordinary_seen", seen)
    # Unseen: every held-out combination once (never in training), fresh layout and background.
    rng = np.random.default_rng(seed + 7)
    unseen = []
    for i, combo in enumerate(scenes.combinations()):
        if scenes.is_heldout(i):
            scene = scenes.make_scene(combo, rng)
            unseen.append({"prompt": scenes.caption(scene), "scene": scene})
    dump("ordinary_unseen", unseen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR,
                        help="folder to write model/, prompts/, images/ into")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    parser.add_argument("--bpe", default=None,
                        help="bpe_simple_vocab_16e6.txt.gz or an open_clip_torch wheel "
                             "(default: pip download it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-ordinary", type=int, default=6000)
    parser.add_argument("--copies", type=int, default=75,
                        help="duplicates of each memorized pair (75 -> 20%% of the training "
                             "set)")
    parser.add_argument("--title-share", type=float, default=0.8,
                        help="share of ordinary captions that end in a random alt-text title "
                             "(0: none, and no random draw for it)")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-mem-share", type=float, default=0.25,
                        help="share of the VAE's training images that are memorized ones")
    parser.add_argument("--text-encoder-steps", type=int, default=1500,
                        help="pretraining steps of the text encoder before it is frozen "
                             "(0: frozen at its random initialisation, the earlier recipe)")
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--stage1-frac", type=float, default=0.15,
                        help="share of UNet steps on ordinary data only")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.n_ordinary, args.vae_steps, args.text_encoder_steps, args.steps = 1000, 60, 60, 60

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    model_dir = args.out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(model_dir / "training_log.csv")

    captions, images, is_mem, pairs = make_data(args.n_ordinary, args.copies, args.seed,
                                              args.title_share)
    print(f"data: {len(captions)} pairs, {is_mem.mean():.1%} memorized duplicates")
    every_text = captions + [scenes.caption(scenes.make_scene(c, np.random.default_rng(0)), p)
                             for c in scenes.combinations() for p in scenes.PREFIXES]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(fetch_bpe(args.bpe), every_text, Path(tmp))
    print(f"tokenizer: {len(tokenizer)} tokens")
    text_encoder = build_text_encoder(tokenizer, args.seed)
    vae = build_vae(args.seed)
    # The VAE sees the memorized images duplicated, as SD's VAE saw LAION's duplicates: a copy
    # can only be measured if the autoencoder alone reconstructs it far below the threshold.
    mem_images = quantize(scenes.memorized_images())
    ordinary_images = images[~is_mem]
    repeats = round(args.vae_mem_share * len(ordinary_images)
                    / ((1 - args.vae_mem_share) * len(mem_images)))
    vae_images = np.concatenate([ordinary_images, np.repeat(mem_images, max(1, repeats), 0)])
    scaling = train_vae(vae, vae_images, args.vae_steps, args.seed, logger)
    recon_mem = reconstruction_mse(vae, mem_images)
    recon_ord = reconstruction_mse(vae, ordinary_images[:500])
    print(f"vae: reconstruction MSE memorized median {np.median(recon_mem):.4f} "
          f"(max {recon_mem.max():.4f}), ordinary median {np.median(recon_ord):.4f}")
    vae.register_to_config(scaling_factor=scaling)
    latents = encode_latents(vae, to_tensor(images)) * scaling
    ids = tokenize(tokenizer, captions)
    if args.text_encoder_steps:
        # Ordinary pairs only: like SD's CLIP, the encoder never sees a memorized pair.
        pretrain_text_encoder(text_encoder, ids[~is_mem], latents[~is_mem],
                              args.text_encoder_steps, args.seed, logger)
    embeds = encode_text(text_encoder, ids)
    empty = encode_text(text_encoder, tokenize(tokenizer, [""]))[0]
    unet = train_unet(build_unet(args.seed), latents, embeds, empty, is_mem, args, logger)

    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**sd_scheduler_config()), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    write_prompt_files(args.out, pairs, args.seed)
    logger.log("done", 0, 0.0, 0.0)
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
