"""The segmentation network of a fine-tune arm: a run's terrain stem + trunk stages under a
light U-Net decoder (plain Keras layers), predicting the 7 palette classes per pixel.

    terrain [B, S, S, 3] --stem--> [B, S/2, S/2, C0] --trunk stages--> s_1 .. s_n
        (resnet34: S/2, S/4, S/8, S/16)
    decoder (n = norm + act): x = n(1x1(n(s_n))); for i = n-1 .. 1: x = n(3x3(up(x) ++ n(s_i)))
        -> 1x1 to 7 logits at s_1's size -> bilinear up to [B, S, S, 7] (float32 logits)

The stem + stages are one nested model, `backbone`, so an arm freezes them with
`backbone.trainable = False`. Decoder weights are seeded, so every arm starts from the same
decoder and only the backbone's weights differ between arms.
"""

from __future__ import annotations

from cmc_kit.palette import NUM_CLASSES

VIEW = "terrain"
# Part of every arm's key: raise it when the decoder changes, so old results are not reused.
DECODER_VERSION = 1
MIN_DECODER_CHANNELS = 32


def decoder_channels_for(encoder) -> int:
    """Decoder width: the first stage's channels, at least MIN_DECODER_CHANNELS."""
    from cmc_kit import models

    first = models.trunk_stage_channels(encoder.config.trunk, encoder.config.width)[0]
    return max(MIN_DECODER_CHANNELS, first)


def _act(x, name):
    import keras

    from cmc_kit import models

    return keras.layers.LeakyReLU(negative_slope=models.LEAKY_SLOPE, name=name)(x)


def build_segmentation_model(encoder, *, decoder_channels: int | None = None, seed: int = 0,
                             name: str = "segmenter"):
    """terrain float32 [B, S, S, 3] in [-1, 1] -> class logits float32 [B, S, S, 7].

    Shares `encoder`'s terrain stem and trunk layers (their weights are the arm's starting
    point); S must be a multiple of `models.input_stride(trunk)`. The nested layer
    "backbone" is the stem + trunk stages.
    """
    import keras

    from cmc_kit import models

    channels = decoder_channels or decoder_channels_for(encoder)
    strides = models.TRUNK_SPECS[encoder.config.trunk].strides
    image = keras.Input(shape=(None, None, 3), name=VIEW)                     # [B, S, S, 3]
    stages = models.stage_model(encoder.trunk(VIEW))(encoder.stem(VIEW)(image))
    backbone = keras.Model(image, stages, name="backbone")                    # s_1 .. s_n

    inputs = keras.Input(shape=(None, None, 3), name=VIEW)
    features = backbone(inputs)

    def conv(x, filters, kernel, layer_name, index):
        # Seeded per layer: every arm starts from the same decoder. No bias: a LayerNorm follows.
        return keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False,
                                   name=layer_name,
                                   kernel_initializer=keras.initializers.HeNormal(seed + index))(x)

    def norm_act(x, layer_name):
        # Per-pixel LayerNorm: the decoder sees every backbone at one scale (a trained trunk's
        # last stage is ~30x larger than a random one's), so arms differ in content, not scale.
        x = keras.layers.LayerNormalization(name=f"{layer_name}_norm")(x)
        return _act(x, f"{layer_name}_act")

    x = norm_act(conv(norm_act(features[-1], "decoder_in"), channels, 1, "decoder_top", 0),
                 "decoder_top")                                             # [B, h_n, w_n, D]
    for i in range(len(features) - 2, -1, -1):                              # s_{n-1} .. s_1
        if strides[i + 1] > 1:
            x = keras.layers.UpSampling2D(strides[i + 1], interpolation="bilinear",
                                          name=f"decoder_up{i + 1}")(x)
        skip = norm_act(features[i], f"decoder_skip{i + 1}")
        x = keras.layers.Concatenate(name=f"decoder_join{i + 1}")([x, skip])
        x = norm_act(conv(x, channels, 3, f"decoder_conv{i + 1}", i + 1),
                     f"decoder_conv{i + 1}")                                # [B, h_i, w_i, D]
    logits = keras.layers.Conv2D(NUM_CLASSES, 1, name="classes", dtype="float32",
                                 kernel_initializer=keras.initializers.HeNormal(seed + 99))(x)
    # A 1x1 conv commutes with bilinear upsampling: classify first, upsample 7 channels.
    logits = keras.layers.UpSampling2D(models.STEM_STRIDE * strides[0], interpolation="bilinear",
                                       name="to_pixels", dtype="float32")(logits)  # [B, S, S, 7]
    return keras.Model(inputs, logits, name=name)


def arm_encoder(handle, arm: str):
    """A fresh encoder for `arm`: the run's checkpoint weights (frozen, finetuned) or the
    weights the run started training from (random_init). Never shared between arms, as
    fine-tuning changes it."""
    from cmc_kit import runs

    if arm == "random_init":
        # The weights the run started from, as `evaluate`'s random_init column: the arms then
        # differ only by what pretraining did, seed for seed.
        from cmc_kit import evaluate
        return evaluate.initial_encoder(handle.config)
    return runs.load_run(handle.run_dir, checkpoint=handle.checkpoint_path).encoder("online")
