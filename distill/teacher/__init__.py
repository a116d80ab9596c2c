"""The frozen CLIP teacher: builder, text / region / pixel embeddings, embedding cache, and the
tiny teacher pretrained on the shapes world. Importing this package registers our open_clip model
configs (``distill-tiny-vit``) with ``open_clip.add_model_config``."""

from distill.teacher.clip import Teacher, build_random_teacher, build_teacher, register_model_configs

register_model_configs()

__all__ = ["Teacher", "build_teacher", "build_random_teacher", "register_model_configs"]
