// Starts Swagger UI (vendored, see ../vendor/VENDOR.md) on the service's OpenAPI document.
// A separate file, not an inline script, so that a same-origin Content-Security-Policy holds.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
