"""Synthetic Pap-smear fields with exact labels (torch-free: numpy + OpenCV; the device's synth:// uses it).

    stain.py      Papanicolaou dyes in optical density, varied per image; shared colour distributions
    shapes.py     contours, anti-aliased masks, texture tiles, the Sprite a drawer returns
    cells.py      painting helpers; normal squames, metaplastic cells, neutrophils, blood, debris
    lesions.py    ascus, lsil, asch, hsil, scc, agc            organisms.py  trichomonas .. actinomyces
    field.py      plan a field, place objects, count the truth  optics.py     light, defocus, noise
    writer.py     `cyto-edge synth OUT` (CDetector layout)      coco.py       COCO documents, label noise
    slide.py      the large slide, its stop schedule, the cache crops.py      labelled crop sets
    grid.py       docs/synth_grid.png                            cli.py        the command

Everything is drawn in µm and converted with the chosen µm per pixel (default 1.0).
"""
