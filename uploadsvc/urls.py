"""Root URLs: the admin, the uploads API, its OpenAPI schema and docs, health and metrics."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from uploads.ops import healthz, metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("uploads.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
]

# Every answer under /api/ is JSON, a 404 or a 500 too.
handler404 = "uploads.exceptions.not_found"
handler500 = "uploads.exceptions.server_error"
