"""Detection transfer: data formats, fine-tuning from a SimSiam backbone, COCO evaluation, detectron2 export."""
