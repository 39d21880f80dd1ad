// Renders /openapi.json with the vendored Swagger UI (swagger-ui-dist, Apache-2.0: LICENSE and
// NOTICE beside this file, served at /docs/LICENSE and /docs/NOTICE). Nothing is fetched from
// elsewhere: the page works offline.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
  });
});
