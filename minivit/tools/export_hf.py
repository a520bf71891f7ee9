"""Export a ViT checkpoint (ours or an official DINO file) as a Hugging Face model folder: config.json +
model.safetensors, which transformers' ViTModel.from_pretrained reads (the mapping of names is minivit/hf.py's).

    python -m minivit.tools.export_hf --arch vit_s8 --weights runs/dino/teacher_backbone.pth --output_dir runs/dino/hf
"""
from minivit import checkpoint, cli
from minivit.hf import export_hf
from minivit.models import load_backbone


def main(argv=None):
    parser = cli.ArgumentParser(description="Export a ViT checkpoint (ours or official DINO) as a Hugging "
                                     "Face model folder: config.json + model.safetensors")
    parser.add_argument("--arch", default="vit_s16", help="a ViT from minivit.models.ARCHS")
    parser.add_argument("--weights", required=True, help="our checkpoint, an official DINO file or a Hugging "
                        "Face folder; the teacher's backbone is taken from a full DINO checkpoint")
    parser.add_argument("--patch_size", type=int, default=None, help="the patch if the ViT was trained with another "
                        "than its name's (small images)")
    parser.add_argument("--output_dir", required=True, help="the folder to write; ViTModel.from_pretrained reads it")
    cli.add_trust_pickle(parser)
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("patch_size",))

    if not args.arch.startswith("vit_"):
        cli.fail(f"--arch {args.arch}: only ViTs have a Hugging Face ViT layout; pick a vit_* arch")
    with cli.errors():  # a file, or a folder under a file, where the folder should go: stop before any work
        checkpoint.make_output_dir(args.output_dir, files=("config.json", "model.safetensors"))
    model = load_backbone(args.arch, args.weights, args.patch_size, trust_pickle=args.trust_pickle)
    print(f"wrote {export_hf(model, args.output_dir)}: config.json, model.safetensors")


if __name__ == "__main__":
    main()
