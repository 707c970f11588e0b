"""Generated sample data for tests, benches and the demo: real photos as an ImageFolder tree
(``photos``) and a toy COCO detection set (``toy_coco``). Nothing in the library imports it."""
