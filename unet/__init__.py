"""brain-mri-unet: U-Net segmentation of lower-grade glioma in brain MRI slices."""
