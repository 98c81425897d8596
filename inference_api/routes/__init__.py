"""The API's routers, one per concern (FastAPI's "bigger applications" layout); inference_api.app includes them."""
