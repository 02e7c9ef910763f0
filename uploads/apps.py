from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class UploadsConfig(AppConfig):
    name = "uploads"
    verbose_name = _("Uploads")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from uploads import access, checks  # noqa: F401  (register the signals and checks)
