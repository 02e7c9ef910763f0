from rest_framework.routers import DefaultRouter

from uploads.api import UploadViewSet

router = DefaultRouter()
router.register("uploads", UploadViewSet, basename="upload")

urlpatterns = router.urls
