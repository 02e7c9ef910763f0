from rest_framework.routers import DefaultRouter

from uploads.api import BatchViewSet, UploadViewSet

router = DefaultRouter()
router.register("uploads", UploadViewSet, basename="upload")
router.register("batches", BatchViewSet, basename="batch")

urlpatterns = router.urls
