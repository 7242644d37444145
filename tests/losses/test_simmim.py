"""SimMIM objective against hand-derived values and a float64 loop."""
import torch

from hvpmtl.losses.simmim import simmim_loss, upsample_mask


def test_hand_case():
    # 1 image, 1 channel pair... 3 channels, 4x4 pixels, 2x2 patch grid -> each patch 2x2 pixels.
    img = torch.zeros(1, 3, 4, 4)
    rec = torch.zeros(1, 3, 4, 4)
    rec[0, :, :2, :2] = 2.0   # error 2 in the top-left patch (masked)
    rec[0, :, 2:, 2:] = 7.0   # error 7 in the bottom-right patch (not masked: must not count)
    mask = torch.tensor([[[True, False], [False, False]]])
    # masked pixels: 4 per channel; sum |err| over them = 3 ch * 4 px * 2 = 24; / (4 + 1e-5) / 3
    expected = 24 / (4 + 1e-5) / 3
    assert abs(simmim_loss(rec, img, mask).item() - expected) < 1e-6


def test_matches_float64_loop():
    g = torch.Generator().manual_seed(0)
    B, C, H, W, p = 3, 3, 32, 32, 8
    img, rec = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    mask = torch.rand(B, H // p, W // p, generator=g) < 0.6
    num = den = 0.0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if mask[b, y // p, x // p]:
                    den += 1
                    num += sum(abs(float(rec[b, c, y, x]) - float(img[b, c, y, x])) for c in range(C))
    expected = num / (den + 1e-5) / C
    assert abs(simmim_loss(rec, img, mask).item() - expected) < 1e-5 * max(1, expected)


def test_unmasked_pixels_get_no_gradient():
    img = torch.randn(2, 3, 16, 16)
    rec = torch.randn(2, 3, 16, 16, requires_grad=True)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[:, 0, 1] = True
    simmim_loss(rec, img, mask).backward()
    pix = upsample_mask(mask, (16, 16)).expand_as(rec).bool()
    assert (rec.grad[~pix] == 0).all()
    assert (rec.grad[pix] != 0).all()
