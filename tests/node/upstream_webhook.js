// Posts one envelope exactly as Evolution API 2.3.6's global webhook does (webhook.controller.ts):
// axios.create({baseURL: globalURL, timeout}).post('', webhookData), no headers of its own, so any
// credentials ride in the URL. Prints {"status": ..., "data": ...} of the answer.
const axios = require("axios");

const [baseURL, body] = process.argv.slice(2);
axios
  .create({ baseURL, timeout: 30000 })
  .post("", JSON.parse(body))
  .then((answer) => console.log(JSON.stringify({ status: answer.status, data: answer.data })))
  .catch((error) => {
    const answer = error.response;
    console.log(JSON.stringify({ status: answer ? answer.status : null, data: answer ? answer.data : error.message }));
  });
