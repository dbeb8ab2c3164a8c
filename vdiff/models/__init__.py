"""Pure nn.Modules (no Lightning): VDT, the autoencoders, the SVD UNet, conditioners.

Import each model from its own module (``from vdiff.models.vdt import VDT_S_2``) so that using one
model does not import the others.
"""
