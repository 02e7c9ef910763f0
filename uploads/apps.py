from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class UploadsConfig(AppConfig):
    name = "uploads"
    verbose_name = _("Uploads")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from uploads import checks  # noqa: F401  (registers the system checks)
