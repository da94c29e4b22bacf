import torch

from locref_core.composite import NEUTRAL, composite_image, placement
from locref_core.layout import Box, Layout, Reference
from locref_core.preview import box_colour, render_preview

RED = torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 40, 60).clone()
BLUE = torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 50, 50).clone()


def colour_mask(image, rgb, tol=0.02):
    return ((image - torch.tensor(rgb)[:, None, None]).abs() <= tol).all(dim=0)


def test_red_reference_appears_only_inside_its_box():
    layout = Layout(256, 128, (Box(0.0, 0.0, 0.5, 1.0, "A", Reference(RED)),
                               Box(0.5, 0, 1, 1, "B")))
    image = composite_image(layout)
    red = colour_mask(image, (1, 0, 0))
    assert red.any()
    assert not red[:, 128:].any()  # nothing red outside box A
    assert colour_mask(image[:, :, 128:], (NEUTRAL,) * 3).all()  # box B has no reference


def test_contain_keeps_aspect_and_centres():
    box = Box(0.25, 0.25, 0.75, 0.75)
    x, y, w, h = placement(box, (40, 60), 200, 200, "contain")
    assert (w, h) == (100, 67) and x == 50 and y == 50 + (100 - 67) // 2
    assert placement(box, (40, 60), 200, 200, "stretch") == (50, 50, 100, 100)
    image = composite_image(Layout(200, 200, (Box(0.25, 0.25, 0.75, 0.75, "", Reference(RED)),)))
    red = colour_mask(image, (1, 0, 0)).nonzero()
    assert red[:, 0].min() >= 66 and red[:, 0].max() <= 133 and red[:, 1].min() >= 50


def test_later_boxes_paint_over_earlier_ones():
    a = Box(0.0, 0.0, 0.75, 0.75, "back", Reference(RED))
    b = Box(0.25, 0.25, 1.0, 1.0, "front", Reference(BLUE))
    image = composite_image(Layout(128, 128, (a, b)), fit="stretch")
    assert colour_mask(image[:, 48:96, 48:96], (0, 0, 1)).all()  # overlap shows the front box
    swapped = composite_image(Layout(128, 128, (b, a)), fit="stretch")
    assert colour_mask(swapped[:, 48:96, 48:96], (1, 0, 0)).all()


def test_mask_removes_the_reference_background():
    mask = torch.zeros(40, 60)
    mask[:, :30] = 1.0  # keep the left half only
    box = Box(0.0, 0.0, 1.0, 1.0, "", Reference(RED, mask))
    image = composite_image(Layout(120, 80, (box,)), fit="stretch")
    assert colour_mask(image[:, :, :55], (1, 0, 0)).all()
    assert colour_mask(image[:, :, 65:], (NEUTRAL,) * 3).all()


def test_preview_outlines_each_box_in_its_colour_at_its_pixels():
    layout = Layout(320, 256, (Box(0.1, 0.2, 0.6, 0.7, "cat"), Box(0.5, 0.5, 0.9, 0.95, "dog")))
    image = render_preview(layout)
    assert image.shape == (3, 256, 320)
    for i, box in enumerate(layout.boxes):
        x0, y0, x1, y1 = box.to_pixels(320, 256)
        rgb = tuple(c / 255 for c in box_colour(i))
        mid_y = (y0 + y1) // 2 + 5
        mid_x = (x0 + x1) // 2
        assert colour_mask(image[:, mid_y:mid_y + 1, x1 - 1:x1], rgb).all()  # right edge
        assert colour_mask(image[:, y1 - 1:y1, mid_x:mid_x + 1], rgb).all()  # bottom edge
        assert not colour_mask(image[:, mid_y:mid_y + 1, x1 + 2:x1 + 3], rgb).any()  # just outside
    assert colour_mask(image[:, 2:10, 2:10], (NEUTRAL,) * 3).all()  # outside all boxes


def test_square_reference_pads_and_greys_the_background():
    from locref_core.composite import square_reference

    mask = torch.zeros(40, 60)
    mask[10:30, 20:40] = 1.0
    out = square_reference(RED, mask)
    assert out.shape == (3, 60, 60)
    assert colour_mask(out[:, :10], (NEUTRAL,) * 3).all()  # padding rows
    assert colour_mask(out[:, 25:35, 25:35], (1, 0, 0)).all()  # kept foreground
    assert colour_mask(out[:, 12:18, 2:10], (NEUTRAL,) * 3).all()  # masked-out background


def test_shrink_to_keeps_aspect_and_leaves_small_images_alone():
    from locref_core.composite import shrink_to

    assert shrink_to(RED, 100) is RED
    big = torch.rand(3, 300, 4200)
    out = shrink_to(big, 2048)
    assert out.shape == (3, 146, 2048)
